//! The local image recipe (`hack/images.sh`, used by the node tests and the local demo) and the
//! Dockerfiles users build with Docker must give images of the same runtime shape: this packs the
//! operator, sidecar and login-app images from this build's binaries and compares each image's
//! config with the runtime stage of its Dockerfile, parsed here independently of the script —
//! user, entrypoint, command and exposed ports — and checks that the binaries land where the
//! entrypoint expects them and that there is no shell in the distroless-like images.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, ensure};
use authrealm_tests::node_env::{build_binaries, repo_root, run};
use serde_json::{Value, json};

/// USER, ENTRYPOINT, CMD and EXPOSE of the last stage of a Dockerfile, as an image config would
/// hold them (EXPOSE ports get "/tcp" when they name no protocol).
fn runtime_stage(dockerfile: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(dockerfile)?;
    let joined = text.replace("\\\n", " ");
    let mut stage = json!({});
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (kw, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let args = args.trim();
        match kw.to_ascii_uppercase().as_str() {
            "FROM" => stage = json!({}),
            "USER" => stage["User"] = json!(args),
            "ENTRYPOINT" => stage["Entrypoint"] = serde_json::from_str(args).context("ENTRYPOINT exec form")?,
            "CMD" => stage["Cmd"] = serde_json::from_str(args).context("CMD exec form")?,
            "EXPOSE" => {
                for port in args.split_whitespace() {
                    let port = if port.contains('/') { port.to_owned() } else { format!("{port}/tcp") };
                    stage["ExposedPorts"][port] = json!({});
                }
            }
            _ => {}
        }
    }
    Ok(stage)
}

/// The image config and the file list of an OCI archive made by hack/images.sh.
fn image(archive: &Path) -> anyhow::Result<(Value, Vec<String>)> {
    let read = |member: &str| -> anyhow::Result<Vec<u8>> {
        let out = Command::new("tar").arg("-xOf").arg(archive).arg(member).output()?;
        ensure!(out.status.success(), "tar {member} from {}", archive.display());
        Ok(out.stdout)
    };
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let index: Value = serde_json::from_slice(&read("index.json")?)?;
    let manifest: Value =
        serde_json::from_slice(&read(&blob(index["manifests"][0]["digest"].as_str().context("manifest")?))?)?;
    let config: Value =
        serde_json::from_slice(&read(&blob(manifest["config"]["digest"].as_str().context("config")?))?)?;
    let layer = blob(manifest["layers"][0]["digest"].as_str().context("layer")?);
    let dir = tempdir()?;
    let out = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&dir).arg(&layer).output()?;
    ensure!(out.status.success(), "extract the layer");
    let list = Command::new("tar").arg("-tf").arg(Path::new(&dir).join(&layer)).output()?;
    std::fs::remove_dir_all(&dir)?;
    let files = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim_start_matches('.').trim_end_matches('/').to_owned())
        .collect();
    Ok((config["config"].clone(), files))
}

fn tempdir() -> anyhow::Result<String> {
    let out = Command::new("mktemp").args(["-d", "/tmp/authrealm-image-recipe.XXXXXX"]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

#[test]
fn local_images_match_the_dockerfiles_runtime_stage() -> anyhow::Result<()> {
    let bin_dir = build_binaries()?;

    let images_dir = tempdir()?;
    let mut pack = Command::new("bash");
    pack.arg(repo_root().join("hack/images.sh"))
        .args(["--no-import", "operator", "sidecar", "login-app"])
        .env("AUTHREALM_IMAGES_DIR", &images_dir)
        .env("AUTHREALM_BIN_DIR", &bin_dir);
    let result = run(&mut pack, "hack/images.sh");
    let checked = result.and_then(|_| {
        for (short, dockerfile, distroless) in [
            ("operator", "images/operator.Dockerfile", true),
            ("sidecar", "images/sidecar.Dockerfile", true),
            ("login-app", "examples/login-app/Dockerfile", false),
        ] {
            let want = runtime_stage(&repo_root().join(dockerfile))?;
            let (got, files) = image(&Path::new(&images_dir).join(format!("{short}.tar")))?;
            for key in ["User", "Entrypoint", "Cmd", "ExposedPorts"] {
                ensure!(
                    got[key] == want[key],
                    "{short}: {key} is {} in the image, {} in {dockerfile}",
                    got[key],
                    want[key]
                );
            }
            ensure!(!want["User"].is_null(), "{dockerfile} sets no USER");
            if distroless {
                let entry = want["Entrypoint"][0].as_str().context("entrypoint")?;
                ensure!(files.iter().any(|f| f == entry), "{short}: the entrypoint {entry} is not in the image");
                ensure!(
                    !files.iter().any(|f| f.ends_with("/sh") || f.ends_with("/bash")),
                    "{short}: the image has a shell"
                );
            }
        }
        Ok(())
    });
    std::fs::remove_dir_all(&images_dir)?;
    checked
}
