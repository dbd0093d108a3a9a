//! Embeds the OCA JSON schemas under `ocpp/` into the binary, so a deployed
//! `csms` needs no schema files beside it.

use std::{env, fs, path::Path};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ocpp");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut out = String::from(
        "/// (version folder, file stem, schema text) for every embedded OCA schema.\npub static EMBEDDED: &[(&str, &str, &str)] = &[\n",
    );
    let mut versions: Vec<_> = fs::read_dir(&root)
        .expect("schemas/ocpp exists")
        .flatten()
        .collect();
    versions.sort_by_key(|e| e.file_name());
    for version in versions {
        let vname = version.file_name().to_string_lossy().into_owned();
        let mut files: Vec<_> = fs::read_dir(version.path())
            .expect("readable")
            .flatten()
            .collect();
        files.sort_by_key(|e| e.file_name());
        for file in files {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            out.push_str(&format!(
                "    ({vname:?}, {stem:?}, include_str!({:?})),\n",
                path.display().to_string()
            ));
        }
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("embedded_schemas.rs");
    fs::write(dest, out).expect("write generated schema table");
}
