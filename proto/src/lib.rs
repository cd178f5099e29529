//! Kiln's wire types: the `.proto` files under this crate and the tonic/prost code
//! generated from them at build time.
//!
//! * [`ingest::v1`]: `kiln.ingest.v1.WriteService`, the ingest API for edge gateways
//!   (see `kiln/ingest/v1/ingest.proto` for the contract, field by field).
//! * [`internal::v1`]: messages between Kiln's own servers in a cluster (the Flight ticket
//!   a querier asks a writer's unpersisted rows with).
//! * [`sparkplug`]: the Eclipse Sparkplug B payload that MQTT sources read and benchmarks
//!   write.

pub mod sparkplug;

pub mod ingest {
    pub mod v1 {
        tonic::include_proto!("kiln.ingest.v1");
    }
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("kiln.internal.v1");

        impl BufferRequest {
            /// The `type_url` of this message in a protobuf `Any` (a Flight ticket).
            pub const TYPE_URL: &'static str = "type.googleapis.com/kiln.internal.v1.BufferRequest";
        }
    }
}

/// Encoded `FileDescriptorSet` of every Kiln proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
