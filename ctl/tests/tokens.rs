//! Capability tokens minted by the controller: `pollen up --nodes 2
//! --cluster-secret-file` gives the controller and the node processes one
//! secret; registration returns a token that the node accepts, while no
//! token or a forged one gets `unauthorized`; pollenctl's data commands
//! fetch a token from the controller by themselves.

use std::time::{Duration, SystemTime};

use dataplane::auth::{Rights, Secret, Token};
use dataplane::client::{Client, PutOptions};
use dataplane::proto::Status;
use pollen_ctl::api::{DeregisterResponse, JobEntry, JobsResponse};
use pollen_tests::control::{Up, PATIENT};

#[test]
fn registration_mints_a_token_the_nodes_accept() {
    let keys = tempfile::tempdir().unwrap();
    let secret_path = keys.path().join("secret");
    std::fs::write(&secret_path, "a-cluster-secret-of-enough-bytes\n").unwrap();
    let mut up = Up::start(
        "[scaling]\nenabled = false\n",
        &[
            "--nodes",
            "2",
            "--cores",
            "1",
            "--cluster-secret-file",
            secret_path.to_str().unwrap(),
            PATIENT[0],
            PATIENT[1],
        ],
    );
    up.wait_open_nodes(2, "two nodes up");

    let j: JobEntry = up.ctl.json(&["job", "register", "guarded", "--lambdas", "2"]);
    let token = j.token.clone().expect("a token with the registration");
    let claims = Token::inspect(&token).expect("a Pollen token");
    assert_eq!((claims.job.as_str(), claims.rights), ("guarded", Rights::READ_WRITE));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert!(claims.expiry > now + 3600 && Some(claims.expiry) == j.token_expiry_unix, "{claims:?}");
    // Listing jobs does not hand tokens out.
    let listed: JobsResponse = up.ctl.json(&["jobs"]);
    assert!(listed.registered.iter().all(|j| j.token.is_none()), "GET hands out no token");

    // Without a token, or with one forged under another secret: unauthorized.
    let mut c = Client::connect(j.node_addr.as_str()).expect("connect");
    let job = match c.job("guarded") {
        Err(e) => {
            assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");
            None
        }
        Ok(j) => Some(j),
    };
    assert!(job.is_none(), "a request without a token was served");
    let forged_secret = Secret::new(b"not-the-cluster-secret-at-all".to_vec()).unwrap();
    let forged = Token::issue(
        &forged_secret,
        "guarded",
        None,
        Rights::ALL,
        SystemTime::now() + Duration::from_secs(600),
    )
    .unwrap();
    c.set_token(Some(forged));
    let e = c.job("guarded").expect_err("a forged token was accepted");
    assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");

    // The minted token works, for this job only.
    c.set_token(Some(token.clone()));
    let job = c.job("guarded").expect("job info with the token");
    c.put_buffer(&job, "x", b"with a capability", PutOptions::default()).expect("put with the token");
    assert_eq!(c.get_buffer(&job, "x").unwrap(), b"with a capability");
    let e = c.job("auto").expect_err("the token opened another job");
    assert_eq!(e.status(), Some(Status::Unauthorized), "{e}");

    // pollenctl's data commands get a token from the controller themselves.
    let file = up.dir.path().join("in.txt");
    std::fs::write(&file, b"via pollenctl").unwrap();
    up.ctl.ok(&["put", "auto", "y", file.to_str().unwrap()]);
    let got = up.ctl.ok(&["get", "auto", "y", "-"]);
    assert_eq!(got.stdout, b"via pollenctl");
    up.ctl.ok(&["get", "guarded", "x", "-"]);

    // The controller deregisters on the node with its own token.
    let d: DeregisterResponse = up.ctl.json(&["job", "deregister", "guarded"]);
    assert!(d.freed, "{d:?}");
    assert!(up.proc.terminate().success());
}
