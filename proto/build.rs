//! Generates the tonic/prost code for Kiln's .proto files, with a vendored protoc so no
//! system package is needed, plus a file descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Arrow IPC arrives as `Bytes`: decoded without a copy out of the request buffer.
        .bytes(".kiln.ingest.v1.ArrowBatch.ipc_stream")
        // Tags decode into an ordered map: no hashing per row, and already in the sorted
        // order a series key needs.
        .btree_map(".kiln.ingest.v1.Row.tags")
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_protos(
            &[
                "kiln/ingest/v1/ingest.proto",
                "kiln/internal/v1/buffer.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=kiln");
    Ok(())
}
