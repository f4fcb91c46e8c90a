//! The controller API's admin token: a secret read from a file
//! (`--admin-token-file`), sent as `Authorization: Bearer TOKEN` by
//! `pollenctl` and by nodes with their heartbeats, compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Shortest token accepted: guessing must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;
/// Environment variable `pollenctl` reads the token from.
pub const TOKEN_ENV: &str = "POLLEN_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "the token in {0} must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} printable characters without spaces"
    )]
    Invalid(String),
}

/// Checks a token's form: printable ASCII without spaces, within the limits.
pub fn valid(token: &str) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads a token file: its content without surrounding whitespace.
pub fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
    if meta.len() > (MAX_TOKEN_LEN + 64) as u64 {
        return Err(TokenError::Invalid(path.display().to_string()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| TokenError::Read { path: path.display().to_string(), source })?;
    let t = text.trim();
    if !valid(t) {
        return Err(TokenError::Invalid(path.display().to_string()));
    }
    Ok(t.to_string())
}

/// Whether an `Authorization` header value carries `token`.
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h.strip_prefix(b"Bearer ") else { return false };
    // Constant time in the token's content (its length is not secret).
    given.ct_eq(token.as_bytes()).into()
}

/// The `Authorization` header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_headers() {
        let t = "0123456789abcdef";
        assert!(authorized(Some(b"Bearer 0123456789abcdef"), t));
        assert!(!authorized(Some(b"Bearer 0123456789abcdeX"), t));
        assert!(!authorized(Some(b"Bearer 0123456789abcde"), t));
        assert!(!authorized(Some(b"Basic 0123456789abcdef"), t));
        assert!(!authorized(None, t));
        assert!(!valid("short"));
        assert!(!valid("has a space in it ok"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, format!("{t}\n")).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), t);
        std::fs::write(&p, "x").unwrap();
        assert!(read_token_file(&p).is_err());
    }
}
