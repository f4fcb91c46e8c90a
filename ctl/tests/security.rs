//! The controller API behind an admin token and TLS: `pollen up --nodes 2`
//! with a self-signed certificate; the nodes' heartbeats carry the token
//! over https; pollenctl finds URL, token and certificate in pollen.json, and
//! is refused without the token or with a wrong one.

use std::process::{Command, Output};

use pollen_ctl::api::{JobEntry, NodeState, NodesResponse};
use pollen_ctl::local::CONTROLLER_ENV;
use pollen_tests::control::{Up, PATIENT};

const POLLENCTL: &str = env!("CARGO_BIN_EXE_pollenctl");
const TOKEN: &str = "s3cret-token-for-the-test-0123456789";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn admin_token_and_tls_guard_the_controller() {
    let keys = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let (cert_path, key_path, token_path) =
        (keys.path().join("cert.pem"), keys.path().join("key.pem"), keys.path().join("token"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    let (cert_s, key_s, token_s) =
        (cert_path.to_str().unwrap(), key_path.to_str().unwrap(), token_path.to_str().unwrap());

    let mut up = Up::start(
        "[scaling]\nenabled = false\n",
        &[
            "--nodes",
            "2",
            "--cores",
            "1",
            "--admin-token-file",
            token_s,
            "--tls-cert",
            cert_s,
            "--tls-key",
            key_s,
            PATIENT[0],
            PATIENT[1],
        ],
    );
    assert!(up.ctl.url.starts_with("https://127.0.0.1:"), "{}", up.ctl.url);

    // pollenctl in the cluster's directory finds URL, token and certificate
    // in pollen.json; both nodes reached the controller over TLS with the token.
    let auto = |args: &[&str]| -> Output {
        Command::new(POLLENCTL)
            .args(args)
            .current_dir(up.dir.path())
            .env_remove(CONTROLLER_ENV)
            .env_remove("POLLEN_ADMIN_TOKEN")
            .env_remove("POLLEN_CA_CERT")
            .output()
            .unwrap()
    };
    pollen_tests::control::wait_for(std::time::Duration::from_secs(20), "two nodes up over TLS", || {
        let out = auto(&["nodes", "--json"]);
        let r: NodesResponse = serde_json::from_slice(&out.stdout).ok()?;
        (r.nodes.iter().filter(|n| n.state == NodeState::Up).count() == 2).then_some(())
    });
    let out = auto(&["job", "register", "secure", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: JobEntry = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j.name, "secure");
    let file = up.dir.path().join("in.txt");
    std::fs::write(&file, b"hello over a guarded control plane").unwrap();
    assert!(auto(&["put", "secure", "a", file.to_str().unwrap()]).status.success());
    let got = auto(&["get", "secure", "a", "-"]);
    assert_eq!(got.stdout, b"hello over a guarded control plane");

    // The URL alone: no token → 401 with a clear message.
    let url = up.ctl.url.clone();
    let explicit = |extra: &[&str], env_token: Option<&str>| -> Output {
        let mut c = Command::new(POLLENCTL);
        c.args(["--controller", &url, "--ca-cert", cert_s]).args(extra).current_dir(keys.path());
        c.env_remove("POLLEN_ADMIN_TOKEN");
        if let Some(t) = env_token {
            c.env("POLLEN_ADMIN_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = explicit(&["nodes"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401") && stderr(&out).contains("admin token"), "{}", stderr(&out));
    let out = explicit(&["nodes"], Some("wrong-token-wrong-token-wrong"));
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    let out = explicit(&["nodes"], Some(TOKEN));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = explicit(&["--admin-token-file", token_s, "events"], None);
    assert!(out.status.success(), "{}", stderr(&out));

    // Without the certificate the server is not trusted; plain http gets no answer.
    let out = Command::new(POLLENCTL)
        .args(["--controller", &url, "--admin-token-file", token_s, "nodes"])
        .current_dir(keys.path())
        .env_remove("POLLEN_CA_CERT")
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown certificate was trusted");
    let plain = url.replacen("https://", "http://", 1);
    let out = Command::new(POLLENCTL)
        .args(["--controller", &plain, "--admin-token-file", token_s, "nodes"])
        .current_dir(keys.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "plain http was answered");

    // /metrics needs the token too.
    let tls = pollen_ctl::tls::client_config(Some(&cert_path)).unwrap();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().tls_config(tls).http_status_as_error(false).build().into();
    let resp = agent.get(format!("{url}/metrics")).call().unwrap();
    assert_eq!(resp.status(), 401);
    let mut resp = agent
        .get(format!("{url}/metrics"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.body_mut().read_to_string().unwrap().contains("pollen_node_up"));

    assert!(up.proc.terminate().success());
}
