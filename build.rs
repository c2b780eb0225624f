//! Embeds MQTT.js (from the npm package installed by `npm ci`) so the demo page never loads it
//! from a CDN. Without `node_modules`, the page explains how to get it.

use std::path::Path;

fn main() {
    let source = Path::new("node_modules/mqtt/dist/mqtt.min.js");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=package-lock.json");
    let out = std::env::var("OUT_DIR").map(std::path::PathBuf::from);
    let Ok(out) = out else {
        return;
    };
    let target = out.join("mqtt.min.js");
    let copied = source.exists() && std::fs::copy(source, &target).is_ok();
    if !copied {
        println!(
            "cargo:warning=node_modules/mqtt is missing: run `npm ci` for the demo page's MQTT.js"
        );
        let stub = "document.addEventListener('DOMContentLoaded',()=>{document.body.insertAdjacentHTML('afterbegin','<p class=\"err\">MQTT.js was not bundled: run <code>npm ci</code> and rebuild callbus.</p>')});";
        let _ = std::fs::write(&target, stub);
    }
}
