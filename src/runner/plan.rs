//! The `inspect` stage's work (offline inspection of the boot disk and the target's preflight verdict), the plan
//! shown before anything is created (and by `--dry-run`), and the final stage report.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use imgshift_converters::DiskSource;
use serde::Serialize;
use serde_json::{Value, json};

use super::DiskInfo;
use crate::guest::Window;
use crate::guest::preflight::{self, Level, Verdict};
use crate::guest::report;
use crate::journal::StageRecord;
use crate::progress::human_size;

/// What inspection found, in short, and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    /// "Debian GNU/Linux 12 (x86_64), BIOS boot" or what was found instead.
    pub guest: String,
    /// The target's verdict.
    pub verdict: Verdict,
    /// Whether the guest's operating system was read (a Linux root filesystem, or a Windows registry): its boot
    /// drivers and boot files are known.
    pub os_read: bool,
    /// The guest is Windows (a Windows system root and no Linux root).
    pub windows: bool,
}

impl Preflight {
    /// "ok", "warn" or "fail".
    pub fn level(&self) -> &'static str {
        level_name(self.verdict.verdict)
    }

    /// One line: the guest and the verdict with its findings' ids.
    pub fn summary(&self) -> String {
        let ids: Vec<&str> = self
            .verdict
            .findings
            .iter()
            .map(|f| f.id.as_str())
            .collect();
        if ids.is_empty() {
            format!("{}; preflight {}", self.guest, self.level())
        } else {
            format!(
                "{}; preflight {} ({})",
                self.guest,
                self.level(),
                ids.join(", ")
            )
        }
    }
}

/// The name of a level.
pub fn level_name(l: Level) -> &'static str {
    match l {
        Level::Ok => "ok",
        Level::Warn => "warn",
        Level::Fail => "fail",
    }
}

/// Inspects the boot disk and evaluates `target`'s preflight rules.
pub fn preflight(boot: &Arc<dyn DiskSource>, target: &str, boot_mode: Option<&str>) -> Preflight {
    let disk = Window::whole(Arc::clone(boot), Arc::new(AtomicU64::new(0)));
    let r = report::inspect(&disk);
    let facts = r.facts(boot_mode);
    let verdict = match preflight::table(target) {
        Some(rules) => preflight::evaluate(target, rules, &facts),
        None => Verdict {
            target: target.to_string(),
            verdict: Level::Ok,
            findings: Vec::new(),
            settings: Default::default(),
        },
    };
    let guest = if let Some(os) = r.operatingsystems.first() {
        let f = &os.facts;
        format!(
            "{} ({}), {} boot",
            f.product_name
                .clone()
                .or_else(|| f.distro.clone())
                .unwrap_or_else(|| "Linux".into()),
            f.arch.as_deref().unwrap_or("unknown arch"),
            r.boot.mode
        )
    } else if let Some(w) = r.windows.first() {
        format!("Windows ({})", w.arch.as_deref().unwrap_or("unknown arch"))
    } else {
        "no operating system found".to_string()
    };
    Preflight {
        guest,
        verdict,
        os_read: facts.linux_root || facts.windows.as_ref().is_some_and(|w| w.registry_read),
        windows: facts.windows.is_some(),
    }
}

/// `--generalize` on a Windows guest, checked before anything is created: `Ok(Some(note))` when sysprep has
/// already generalised it (the stage is a no-op that says so), `Err` with the command to run inside the guest
/// (`sysprep /generalize /oobe /shutdown`) when it has not; `Ok(None)` for a guest that is not Windows.
pub fn windows_generalize(boot: &Arc<dyn DiskSource>) -> anyhow::Result<Option<String>> {
    crate::generalize::verify::windows_state(Arc::clone(boot))
        .map_err(|e| e.context("--generalize refused; nothing was sent"))
}

/// The plan, one line each: the disks, the data to send and what will be created.
pub fn plan_lines(target: &str, disks: &[DiskInfo], creates: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let data: u64 = disks.iter().map(|d| d.data_bytes).sum();
    let virt: u64 = disks.iter().map(|d| d.virtual_size).sum();
    out.push(format!(
        "plan: {} disk{} to {target}, {} of data to send out of {} virtual",
        disks.len(),
        if disks.len() == 1 { "" } else { "s" },
        human_size(data),
        human_size(virt)
    ));
    for (i, d) in disks.iter().enumerate() {
        out.push(format!(
            "  disk {i}: {} ({} virtual, {} data)",
            d.name,
            human_size(d.virtual_size),
            human_size(d.data_bytes)
        ));
    }
    for c in creates {
        out.push(format!("  will create {c}"));
    }
    out
}

/// The findings worth printing (warn and fail), one line each.
pub fn finding_lines(p: &Preflight) -> Vec<String> {
    p.verdict
        .findings
        .iter()
        .filter(|f| f.level != Level::Ok)
        .map(|f| {
            format!(
                "preflight {}: {}: {} (fix: {})",
                level_name(f.level),
                f.id,
                f.reason,
                f.fix
            )
        })
        .collect()
}

/// Everything the report says.
pub struct ReportInput<'a> {
    /// Job id.
    pub job: &'a str,
    /// Target name.
    pub target: &'a str,
    /// Source path.
    pub source: &'a str,
    /// The disks.
    pub disks: &'a [DiskInfo],
    /// Bytes sent per disk (over every run of the job).
    pub sent: &'a [u64],
    /// What the target made.
    pub outputs: Value,
    /// The stages, with times.
    pub stages: &'a [StageRecord],
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
}

/// The JSON report.
pub fn report_json(r: &ReportInput<'_>) -> Value {
    let disks: Vec<Value> = r
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({
                "name": d.name,
                "virtual_size": d.virtual_size,
                "data_bytes": d.data_bytes,
                "bytes_sent": r.sent.get(i).copied().unwrap_or(0),
            })
        })
        .collect();
    let stages: Vec<Value> = r
        .stages
        .iter()
        .map(|s| json!({"name": s.name, "seconds": (s.seconds * 1000.0).round() / 1000.0, "result": s.detail}))
        .collect();
    json!({
        "job": r.job,
        "target": r.target,
        "source": r.source,
        "resumed": r.resumed,
        "disks": disks,
        "virtual_size": r.disks.iter().map(|d| d.virtual_size).sum::<u64>(),
        "data_bytes": r.disks.iter().map(|d| d.data_bytes).sum::<u64>(),
        "bytes_sent": r.sent.iter().sum::<u64>(),
        "outputs": r.outputs,
        "stages": stages,
    })
}

/// The human report (standard output).
pub fn report_text(r: &ReportInput<'_>) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "job {} → {}: done", r.job, r.target);
    for s in r.stages {
        let _ = writeln!(t, "  {:<10} {:>7.1} s  {}", s.name, s.seconds, s.detail);
    }
    let sent: u64 = r.sent.iter().sum();
    let virt: u64 = r.disks.iter().map(|d| d.virtual_size).sum();
    let _ = writeln!(
        t,
        "  sent {} for {} virtual ({} disk{})",
        human_size(sent),
        human_size(virt),
        r.disks.len(),
        if r.disks.len() == 1 { "" } else { "s" }
    );
    if let Value::Object(m) = &r.outputs {
        for (k, v) in m {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(t, "  {k}: {v}");
        }
    }
    t
}
