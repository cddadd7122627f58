//! Compiles `proto/stepgate/v1/*.proto` with protox (pure Rust, so no `protoc` is needed) and
//! tonic-prost-build, and writes the encoded descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos: Vec<PathBuf> = fs::read_dir("proto/stepgate/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    protos.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    protos.sort();
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let fds = protox::compile(&protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("stepgate_descriptor.bin"), fds.encode_to_vec())?;

    // `Decide` answers a message that does not decode (a string field that is not UTF-8) with a
    // DENY, as every other request it cannot decide on: `api::codec`.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::api::codec::Codec")
        .compile_fds(fds)?;

    // Reflection for `Check` too: envoy-types ships Envoy's protos (and their imports) in its
    // package; compiled here into a second descriptor set, so `grpcurl list` shows
    // `envoy.service.auth.v3.Authorization` and `describe` works without a local copy.
    let envoy = envoy_types_protos()?;
    let includes = [
        "data-plane-api",
        "googleapis",
        "protoc-gen-validate",
        "xds",
        "cel-spec",
    ]
    .map(|dir| envoy.join(dir));
    let envoy_fds = protox::compile(["envoy/service/auth/v3/external_auth.proto"], includes)?;
    fs::write(
        out_dir.join("envoy_auth_descriptor.bin"),
        envoy_fds.encode_to_vec(),
    )?;
    Ok(())
}

/// The `proto` folder of the envoy-types package this build uses, found with `cargo metadata`
/// (the registry, a vendor folder or a git checkout alike).
fn envoy_types_protos() -> Result<PathBuf, Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let metadata = |offline: bool| {
        let mut command = std::process::Command::new(&cargo);
        command.args(["metadata", "--format-version", "1", "--locked"]);
        if offline {
            command.arg("--offline");
        }
        // Only the packages of this target.
        command
            .args(["--filter-platform", &env::var("TARGET")?])
            .arg("--manifest-path")
            .arg(PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml"))
            .output()
            .map_err(Box::<dyn std::error::Error>::from)
    };
    // Offline first: the build has downloaded what it compiles. A build of the binary alone
    // (`cargo build -p stepgate`, the Dockerfile) may not have downloaded the dev-dependencies
    // the full resolve names; then cargo may fetch them.
    let mut output = metadata(true)?;
    if !output.status.success() {
        output = metadata(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let text = String::from_utf8(output.stdout)?;
    // The package object `{"name":"envoy-types", …, "manifest_path":"…/Cargo.toml", …}`.
    let package = text
        .find("{\"name\":\"envoy-types\",\"version\":")
        .ok_or("cargo metadata lists no envoy-types package")?;
    let key = "\"manifest_path\":\"";
    let start = text[package..]
        .find(key)
        .ok_or("envoy-types has no manifest_path")?
        + package;
    let manifest = text[start + key.len()..]
        .split('"')
        .next()
        .map(PathBuf::from);
    manifest
        .and_then(|manifest| manifest.parent().map(|dir| dir.join("proto")))
        .filter(|dir| dir.is_dir())
        .ok_or_else(|| "the envoy-types package's proto folder was not found".into())
}
