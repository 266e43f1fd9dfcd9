//! Compiles `proto/stasis.proto` with protox (pure Rust, no system `protoc`) and generates the
//! prost types into `$OUT_DIR/stasis.image.v1.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/stasis.proto");
    let fds = protox::compile(["stasis.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    config.compile_fds(fds)?;
    Ok(())
}
