fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/lumbung.proto"], ["proto"])?;
    // Bulk data fields decode as `Bytes`: no copy between the wire and the chunk store.
    tonic_prost_build::configure()
        .bytes(".")
        // A PUT stream's header is its one large frame, sent once: boxing
        // it would cost an allocation to save nothing.
        .enum_attribute(
            ".lumbung.PutFrame.frame",
            "#[allow(clippy::large_enum_variant)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
