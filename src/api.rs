//! The generated `stepgate.v1` gRPC types (from `proto/stepgate/v1/*.proto`, compiled by build.rs).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("stepgate.v1");
}

/// Encoded `FileDescriptorSet` of stepgate's own protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stepgate_descriptor.bin"));
