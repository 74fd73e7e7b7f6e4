//! What a point records about its guest: imgshift's offline inspection of the source when the point is made
//! (reads a few MiB), with each target's preflight verdict and settings, so failover sets the target up without
//! reading the replica back.

use std::sync::Arc;

use imgshift_converters::DiskSource;

use crate::replica::{GuestRecord, TargetVerdict};

/// Inspects `src` and evaluates every target's preflight rules.
pub fn inspect(src: Arc<dyn DiskSource>) -> GuestRecord {
    let (generation, why) = crate::targets::azure::hyperv::detect(src.as_ref());
    let disk = crate::guest::Window::whole(src, Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let report = crate::guest::report::inspect(&disk);
    let facts = report.facts(None);
    let os = match (report.operatingsystems.first(), report.windows.first()) {
        (Some(o), _) => o
            .facts
            .product_name
            .clone()
            .or_else(|| o.facts.distro.clone())
            .unwrap_or_else(|| "Linux".into()),
        (None, Some(w)) => w.product_name.clone().unwrap_or_else(|| "Windows".into()),
        (None, None) => "no operating system found".into(),
    };
    let mut targets = std::collections::BTreeMap::new();
    for t in crate::target_kind::TargetKind::all() {
        let name = t.name();
        let Some(rules) = crate::guest::preflight::table(name) else {
            continue;
        };
        let v = crate::guest::preflight::evaluate(name, rules, &facts);
        let level = |l: crate::guest::preflight::Level| {
            serde_json::to_value(l)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        };
        targets.insert(
            name.to_string(),
            TargetVerdict {
                verdict: level(v.verdict),
                findings: v
                    .findings
                    .iter()
                    .map(|f| format!("{}: {} — {}", level(f.level), f.reason, f.fix))
                    .collect(),
                settings: v.settings,
            },
        );
    }
    GuestRecord {
        os,
        os_read: facts.linux_root || facts.windows.as_ref().is_some_and(|w| w.registry_read),
        partition_firmware: Some((
            if generation == "V2" { "uefi" } else { "bios" }.to_string(),
            why.to_string(),
        )),
        targets,
    }
}
