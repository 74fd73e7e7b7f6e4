//! The one place that names the targets imgshift makes things on: the command line's `--to`/`--target`, the
//! job kinds, the generalisation operations and the preflight tables all use [`TargetKind`] and its names.

/// A target imgshift can make a bootable image on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum TargetKind {
    /// An AMI (EBS direct APIs, no S3)
    Aws,
    /// An Azure managed image (and data disks), or a gallery image version
    Azure,
    /// libvirt storage volumes and a domain
    Libvirt,
}

impl TargetKind {
    /// Every target.
    const ALL: [TargetKind; 3] = [TargetKind::Aws, TargetKind::Azure, TargetKind::Libvirt];

    /// Every target, in a fixed order.
    pub fn all() -> [TargetKind; 3] {
        TargetKind::ALL
    }

    /// Its name on the command line, in job kinds and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Aws => "aws",
            TargetKind::Azure => "azure",
            TargetKind::Libvirt => "libvirt",
        }
    }

    /// The target a name names.
    pub fn from_name(name: &str) -> Option<TargetKind> {
        TargetKind::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Where `imgshift replicate` keeps recovery points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ReplicaKind {
    /// qcow2 files in a folder, each point a layer over the previous one
    File,
    /// qcow2 volumes in a libvirt storage pool, each point a layer over the previous one
    Libvirt,
    /// EBS snapshots, each point a child snapshot of the previous one holding only the changed blocks
    Aws,
}

impl ReplicaKind {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaKind::File => "file",
            ReplicaKind::Libvirt => "libvirt",
            ReplicaKind::Aws => "aws",
        }
    }

    /// The kind a name names.
    pub fn from_name(name: &str) -> Option<ReplicaKind> {
        [ReplicaKind::File, ReplicaKind::Libvirt, ReplicaKind::Aws]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_round_trip_and_match_the_command_line() {
        for t in TargetKind::ALL {
            assert_eq!(TargetKind::from_name(t.name()), Some(t));
            let pv = t.to_possible_value().unwrap();
            assert_eq!(pv.get_name(), t.name());
        }
        assert_eq!(TargetKind::from_name("gce"), None);
    }
}
