//! Small helpers for tests that talk to a node's Gitaly gRPC service.

use refvote_proto::gitaly::Repository;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::node::Node;

/// A repository in the `default` storage, as a client names it.
pub fn repo(relative: &str) -> Option<Repository> {
    Some(Repository {
        storage_name: "default".into(),
        relative_path: relative.into(),
        ..Default::default()
    })
}

/// A connected channel to `node`'s gRPC service (over TLS if it serves TLS).
pub async fn channel(node: &Node) -> Channel {
    let mut endpoint = Channel::from_shared(node.grpc_url()).expect("a valid URL");
    if let Some(ca) = &node.tls {
        endpoint = endpoint
            .tls_config(ca.client().expect("the test CA"))
            .expect("a TLS config");
    }
    endpoint
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("the node's gRPC service accepts connections")
}

/// `message` as a request inside refvote transaction `tx` (the metadata a router sends).
pub fn with_tx<T>(message: T, tx: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        refvote_proto::contract::TX_METADATA,
        MetadataValue::try_from(tx).expect("a transaction id is ASCII"),
    );
    r
}
