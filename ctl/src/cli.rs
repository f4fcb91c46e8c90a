//! Pieces shared by the `pollen` and `pollenctl` binaries.

/// Logs to standard error at `default` level unless `RUST_LOG` says
/// otherwise; colours only on a terminal.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// An error and its causes on one line, `outer: inner: root`, skipping a
/// cause whose text the previous message already ends with (errors that
/// print their source as well as exposing it).
pub fn error_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("listen on x: {source}")]
    struct Loud {
        source: std::io::Error,
    }

    #[test]
    fn chains_without_repeating_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(Loud { source: io }).context("starting the node");
        assert_eq!(error_message(&e), "starting the node: listen on x: Address already in use");
        let e = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_message(&e), "top: middle: root");
    }
}
