//! A node keeps its role in its data directory, like its number: a restart
//! with another role is refused (by the library and by `pollen node`) with
//! an error that names the kept role, and one with the same role starts.

use std::process::{Command, Stdio};

use dataplane::node::{NetBackend, Node, NodeConfig, NodeError, Role, ROLE_FILE};
use pollen_tests::proc::pollen_bin;
use pollen_tests::{node_config, TierDir};

#[test]
fn the_role_is_kept_in_the_data_directory() {
    let dir = TierDir::new("role-kept");
    let cfg = |role| NodeConfig {
        role,
        node_number: Some(3),
        data_dir: Some(dir.0.clone()),
        ..node_config(1, NetBackend::Epoll, 4096, 16)
    };
    Node::start(cfg(Role::Storage)).unwrap().shutdown();
    assert_eq!(std::fs::read_to_string(dir.file(ROLE_FILE)).unwrap(), "storage\n");
    Node::start(cfg(Role::Storage)).unwrap().shutdown();
    for asked in [Role::Metadata, Role::Both] {
        match Node::start(cfg(asked)) {
            Err(e @ NodeError::Role { kept: Role::Storage, .. }) => {
                assert!(e.to_string().contains("--role storage"), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("role {asked} was accepted on a storage node's data directory"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.file(ROLE_FILE)).unwrap(),
        "storage\n",
        "a refusal changes nothing"
    );

    // `pollen node` without --role is a `both` node: refused there too, saying why.
    let data = dir.0.display().to_string();
    let out = Command::new(pollen_bin())
        .args(["node", "--port", "0", "--no-pin", "--controller", "http://127.0.0.1:9", "--cores", "1"])
        .args(["--block-size", "4KiB", "--dram-gb", "0.004", "--data-dir", &data])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "pollen node started with another role");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to a storage node") && err.contains("--role storage"), "{err}");

    // A file that holds no role is refused, not guessed.
    std::fs::write(dir.file(ROLE_FILE), "archive\n").unwrap();
    let e = Node::start(cfg(Role::Storage)).err().expect("refused");
    assert!(e.to_string().contains("does not hold a role"), "{e}");
}
