fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/lumbung.proto"], ["proto"])?;
    // Bulk data fields decode as `Bytes`: no copy between the wire and the chunk store.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
