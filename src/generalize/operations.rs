//! The generalisation operations: what each removes, whether it runs by default, and how it maps onto
//! virt-sysprep (guestfs-tools `sysprep/sysprep_operation_*.ml`) — the table is data, easy to read and extend.

use std::collections::BTreeSet;

/// Where an imported disk is going; some operations only matter for one target.
pub use crate::target_kind::TargetKind as Target;

/// What an operation does to the paths it names, for the before/after report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The files are removed.
    Remove,
    /// The file is kept but emptied (machine-id: systemd regenerates an empty one at boot).
    Empty,
}

/// One operation.
#[derive(Debug)]
pub struct Operation {
    /// Name on the command line.
    pub name: &'static str,
    /// One line for `--list-operations`.
    pub description: &'static str,
    /// Runs without being named (operations that can lock a user out never do).
    pub default: bool,
    /// Only added by default for this target (still nameable for any).
    pub target: Option<Target>,
    /// virt-sysprep operations it runs.
    pub sysprep: &'static [&'static str],
    /// Paths removed through virt-sysprep's `--delete` (globs, customize operation).
    pub delete: &'static [&'static str],
    /// Paths the report checks before and after (globs: `*` within one name, `**/` any depth of folders).
    pub paths: &'static [&'static str],
    /// What happens to those paths.
    pub effect: Effect,
}

/// Every operation, in the order they are listed.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        name: "machine-id",
        description: "empty /etc/machine-id (systemd makes a new one at first boot) and remove the D-Bus copy",
        default: true,
        target: None,
        sysprep: &["machine-id"],
        delete: &[],
        paths: &["/etc/machine-id"],
        effect: Effect::Empty,
    },
    Operation {
        name: "ssh-hostkeys",
        description: "remove the SSH host keys (/etc/ssh/ssh_host_*); sshd or cloud-init makes new ones",
        default: true,
        target: None,
        sysprep: &["ssh-hostkeys"],
        delete: &[],
        paths: &["/etc/ssh/ssh_host_*"],
        effect: Effect::Remove,
    },
    Operation {
        name: "logs",
        description: "remove log files under /var/log (and the journal)",
        default: true,
        target: None,
        sysprep: &["logfiles"],
        delete: &[],
        paths: &[
            "/var/log/*.log",
            "/var/log/syslog",
            "/var/log/messages",
            "/var/log/journal/**/*",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "shell-history",
        description: "remove shell histories (.bash_history, .zsh_history) of root and every user",
        default: true,
        target: None,
        // virt-sysprep 1.48 (Debian 12) has no zsh-history operation: zsh histories go through --delete.
        sysprep: &["bash-history"],
        delete: &["/root/.zsh_history", "/home/*/.zsh_history"],
        paths: &[
            "/root/.bash_history",
            "/home/*/.bash_history",
            "/root/.zsh_history",
            "/home/*/.zsh_history",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "tmp-files",
        description: "remove the contents of /tmp and /var/tmp",
        default: true,
        target: None,
        sysprep: &["tmp-files"],
        delete: &[],
        paths: &["/tmp/*", "/var/tmp/*"],
        effect: Effect::Remove,
    },
    Operation {
        name: "dhcp-leases",
        description: "remove DHCP client leases (dhclient, NetworkManager, systemd-networkd)",
        default: true,
        target: None,
        sysprep: &["dhcp-client-state"],
        delete: &[
            "/var/lib/NetworkManager/*.lease",
            "/run/systemd/netif/leases/*",
        ],
        paths: &[
            "/var/lib/dhcp/*.leases",
            "/var/lib/dhclient/*",
            "/var/lib/NetworkManager/*.lease",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "net-persistent",
        description: "remove udev persistent net rules and HWADDR= lines that pin a NIC to the old MAC address",
        default: true,
        target: None,
        sysprep: &["udev-persistent-net", "net-hwaddr"],
        delete: &[],
        paths: &["/etc/udev/rules.d/70-persistent-net.rules"],
        effect: Effect::Remove,
    },
    Operation {
        name: "package-cache",
        description: "remove package manager caches (apt, dnf, yum, zypper)",
        default: true,
        target: None,
        sysprep: &["package-manager-cache"],
        delete: &[],
        paths: &[
            "/var/cache/apt/archives/*.deb",
            "/var/cache/dnf/**/*",
            "/var/cache/yum/**/*",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "crash-dumps",
        description: "remove kernel crash dumps (/var/crash, /var/log/dump)",
        default: true,
        target: None,
        sysprep: &["crash-data"],
        delete: &[],
        paths: &["/var/crash/*"],
        effect: Effect::Remove,
    },
    Operation {
        name: "utmp",
        description: "remove login records (utmp, wtmp, btmp)",
        default: true,
        target: None,
        sysprep: &["utmp"],
        delete: &["/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog"],
        paths: &["/var/run/utmp", "/var/log/wtmp", "/var/log/btmp"],
        effect: Effect::Remove,
    },
    Operation {
        name: "passwd-backups",
        description: "remove /etc/passwd-, /etc/shadow-, /etc/group-, /etc/gshadow- backups",
        default: true,
        target: None,
        sysprep: &["passwd-backups"],
        delete: &[],
        paths: &[
            "/etc/passwd-",
            "/etc/shadow-",
            "/etc/group-",
            "/etc/gshadow-",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "cloud-init",
        description: "remove cloud-init's instance state so it runs again on the new cloud",
        default: true,
        target: None,
        sysprep: &[],
        delete: &[
            "/var/lib/cloud/instance",
            "/var/lib/cloud/instances",
            "/var/lib/cloud/data",
            "/var/lib/cloud/sem",
        ],
        paths: &[
            "/var/lib/cloud/instance",
            "/var/lib/cloud/instances/**/*",
            "/var/lib/cloud/data/*",
            "/var/lib/cloud/sem/*",
        ],
        effect: Effect::Remove,
    },
    Operation {
        name: "azure-agent",
        description: "remove the Azure Linux agent's state (/var/lib/waagent), as `waagent -deprovision` does",
        default: true,
        target: Some(Target::Azure),
        sysprep: &[],
        delete: &["/var/lib/waagent/*"],
        paths: &["/var/lib/waagent/*"],
        effect: Effect::Remove,
    },
    Operation {
        name: "ssh-userdir",
        description: "remove every user's ~/.ssh (authorized keys): can lock you out, never run by default",
        default: false,
        target: None,
        sysprep: &["ssh-userdir"],
        delete: &[],
        paths: &["/root/.ssh/*", "/home/*/.ssh/*"],
        effect: Effect::Remove,
    },
    Operation {
        name: "user-accounts",
        description: "remove every non-system user account and home: can lock you out, never run by default",
        default: false,
        target: None,
        sysprep: &["user-account"],
        delete: &[],
        paths: &["/home/*"],
        effect: Effect::Remove,
    },
];

/// Finds an operation by name.
pub fn find(name: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|o| o.name == name)
}

/// The default set for a target.
pub fn defaults(target: Option<Target>) -> Vec<&'static Operation> {
    OPERATIONS
        .iter()
        .filter(|o| o.default && (o.target.is_none() || o.target == target))
        .collect()
}

/// Resolves `--operations`: a comma-separated list where `NAME` adds, `-NAME` removes and `defaults` adds the
/// default set. A list of removals only starts from the defaults; an absent list is the defaults.
pub fn select(
    spec: Option<&str>,
    target: Option<Target>,
) -> Result<Vec<&'static Operation>, String> {
    let Some(spec) = spec else {
        return Ok(defaults(target));
    };
    let items: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err("--operations is empty (see --list-operations)".into());
    }
    let mut chosen: BTreeSet<&'static str> = BTreeSet::new();
    if items.iter().all(|i| i.starts_with('-')) {
        chosen.extend(defaults(target).iter().map(|o| o.name));
    }
    for item in items {
        if item == "defaults" {
            chosen.extend(defaults(target).iter().map(|o| o.name));
            continue;
        }
        let (remove, name) = match item.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, item),
        };
        let op = find(name).ok_or_else(|| {
            format!("unknown operation '{name}' (imgshift generalize --list-operations lists them)")
        })?;
        if remove {
            chosen.remove(op.name);
        } else {
            chosen.insert(op.name);
        }
    }
    if chosen.is_empty() {
        return Err("--operations selects no operation".into());
    }
    Ok(OPERATIONS
        .iter()
        .filter(|o| chosen.contains(o.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ops: &[&Operation]) -> Vec<&'static str> {
        ops.iter().map(|o| o.name).collect()
    }

    #[test]
    fn defaults_never_lock_anyone_out() {
        for t in [
            None,
            Some(Target::Aws),
            Some(Target::Azure),
            Some(Target::Libvirt),
        ] {
            let d = names(&defaults(t));
            assert!(!d.contains(&"ssh-userdir") && !d.contains(&"user-accounts"));
            assert!(d.contains(&"machine-id") && d.contains(&"cloud-init"));
            assert_eq!(d.contains(&"azure-agent"), t == Some(Target::Azure));
        }
    }

    #[test]
    fn selection_adds_removes_and_refuses_unknown_names() {
        assert_eq!(
            names(&select(Some("machine-id,logs"), None).unwrap()),
            vec!["machine-id", "logs"]
        );
        let without = names(&select(Some("-logs"), None).unwrap());
        assert!(!without.contains(&"logs") && without.contains(&"machine-id"));
        let plus = names(&select(Some("defaults,ssh-userdir"), None).unwrap());
        assert!(plus.contains(&"ssh-userdir") && plus.contains(&"tmp-files"));
        assert!(select(Some("bogus"), None).unwrap_err().contains("'bogus'"));
        assert!(select(Some(""), None).is_err());
        assert!(select(Some("logs,-logs"), None).is_err());
    }

    #[test]
    fn every_operation_does_something_and_is_checked() {
        for o in OPERATIONS {
            assert!(!o.sysprep.is_empty() || !o.delete.is_empty(), "{}", o.name);
            assert!(!o.paths.is_empty(), "{}", o.name);
            assert!(o.paths.iter().all(|p| p.starts_with('/')), "{}", o.name);
        }
    }
}
