//! `pollen up --nodes N --metadata-nodes K`: the first K node processes run
//! `--role metadata`, the others (and those scaling starts later) `--role
//! storage`; jobs are homed on a metadata node, their blocks go to the
//! storage nodes, data goes in and out through `pollenctl`, each node keeps
//! its role in its data directory, and a metadata node is not drained.

use std::collections::BTreeMap;
use std::process::Command;

use pollen_ctl::api::{JobEntry, PutOutput, Role, ScaleResponse};
use pollen_tests::control::{Up, PATIENT, SMALL_POLICY};

#[test]
fn up_with_metadata_nodes_splits_the_roles() {
    let up = Up::start(
        SMALL_POLICY,
        &[
            "--nodes",
            "3",
            "--metadata-nodes",
            "1",
            "--max-nodes",
            "4",
            "--cores",
            "1",
            PATIENT[0],
            PATIENT[1],
        ],
    );
    up.wait_open_nodes(3, "three nodes up");
    let roles = |up: &Up| -> BTreeMap<String, Role> {
        up.nodes().nodes.iter().map(|n| (n.report.node_id.clone(), n.report.role)).collect()
    };
    assert_eq!(
        roles(&up),
        BTreeMap::from([
            ("node-0".to_string(), Role::Metadata),
            ("node-1".to_string(), Role::Storage),
            ("node-2".to_string(), Role::Storage),
        ])
    );
    for (id, role) in [("node-0", "metadata"), ("node-1", "storage")] {
        let kept =
            std::fs::read_to_string(up.path(&format!("pollen-data/nodes/{id}/role"))).expect("role file");
        assert_eq!(kept, format!("{role}\n"), "{id} keeps its role in its data directory");
    }

    let j: JobEntry = up.ctl.json(&["job", "register", "split", "--lambdas", "4"]);
    assert_eq!(j.node_id, "node-0", "the job's namespace is on the metadata node");
    assert!(j.weights.get("node-0").copied().unwrap_or(0.0) == 0.0, "no blocks on the metadata node: {j:?}");
    let sum: f64 = j.weights.values().sum();
    assert!((sum - 1.0).abs() < 1e-9, "{:?}", j.weights);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(up.path("in.bin"), &data).expect("input");
    let put: PutOutput = up.ctl.json(&["put", "split", "obj", "in.bin"]);
    assert_eq!(put.bytes, data.len() as u64);
    up.ctl.ok(&["get", "split", "obj", "out.bin"]);
    assert_eq!(std::fs::read(up.path("out.bin")).expect("output"), data);

    // A metadata node is not drained (it holds namespaces, not blocks)...
    let err = up.ctl.fails(&["drain", "node-0"]);
    assert!(err.contains("metadata node"), "{err}");
    // ...and nodes started later store blocks.
    let r: ScaleResponse = up.ctl.json(&["scale", "--nodes", "4"]);
    assert_eq!(r.started, vec!["node-3".to_string()]);
    up.wait_open_nodes(4, "four nodes up");
    assert_eq!(roles(&up)["node-3"], Role::Storage);
}

#[test]
fn metadata_nodes_must_leave_a_storage_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["up", "--nodes", "2", "--metadata-nodes", "2", "--ctl-port", "0"])
        .current_dir(dir.path())
        .output()
        .expect("run pollen up");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leaves no storage node"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(["up", "--metadata-nodes", "1", "--ctl-port", "0"])
        .current_dir(dir.path())
        .output()
        .expect("run pollen up");
    assert!(!out.status.success(), "--metadata-nodes without --nodes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes"));
}
