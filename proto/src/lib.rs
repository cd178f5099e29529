//! Kiln's wire types: the `.proto` files under this crate and the tonic/prost code
//! generated from them at build time.
//!
//! * [`ingest::v1`]: `kiln.ingest.v1.WriteService`, the ingest API for edge gateways
//!   (see `kiln/ingest/v1/ingest.proto` for the contract, field by field).
//! * [`sparkplug`]: the Eclipse Sparkplug B payload that MQTT sources read and benchmarks
//!   write.

pub mod sparkplug;

pub mod ingest {
    pub mod v1 {
        tonic::include_proto!("kiln.ingest.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Kiln proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
