use dataplane::client::{Client, PutOptions};
use dataplane::node::NetBackend;
use dataplane::proto::JobHints;

#[test]
fn put_get_round_trip() {
    let node = pollen_tests::node(2, NetBackend::Epoll, 4096, 1024);
    let mut c = Client::connect(node.addr()).unwrap();
    let job = c.register_job("j", JobHints::default()).unwrap();
    let data = pollen_tests::bytes(100_000, 3);
    c.put_buffer(&job, "a", &data, PutOptions::default()).unwrap();
    assert_eq!(c.get_buffer(&job, "a").unwrap(), data);
    node.shutdown();
}
