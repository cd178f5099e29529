//! Generates the tonic/prost code for Kiln's .proto files, with a vendored protoc so no
//! system package is needed, plus a file descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kiln_descriptor.bin"))
        .compile_protos(&["kiln/ingest/v1/ingest.proto"], &["."])?;
    println!("cargo:rerun-if-changed=kiln");
    Ok(())
}
