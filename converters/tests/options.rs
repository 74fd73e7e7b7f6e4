#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `-o` option lists (`writer_options`, what `-o help` prints) agree with what the writers take: every listed
//! key is accepted at its listed default, an unknown key is refused with the list of valid ones.

use imgshift_converters::{Format, OptionKind, WriterOptions, create_writer, writer_options};

const WRITABLE: [Format; 6] = [
    Format::Raw,
    Format::Qcow2,
    Format::Vpc,
    Format::Vhdx,
    Format::Vmdk,
    Format::Vdi,
];

#[test]
fn every_listed_option_is_taken_at_its_default() {
    for f in WRITABLE {
        let spec = writer_options(f).unwrap();
        for o in spec {
            // backing_file/backing_fmt have no value to default to ("none"): they are checked as a pair below.
            if o.default == "none" {
                continue;
            }
            let mut opts = WriterOptions::default();
            opts.set(o.name, o.default);
            create_writer(f, &mut opts)
                .unwrap_or_else(|e| panic!("{f}: {}={} refused: {e}", o.name, o.default));
            if o.kind == OptionKind::Bool {
                assert!(
                    ["on", "off"].contains(&o.default),
                    "{f}: {} default {}",
                    o.name,
                    o.default
                );
            }
            assert!(!o.help.is_empty(), "{f}: {} has no description", o.name);
        }
    }
    let mut opts = WriterOptions::default();
    opts.parse_into("backing_file=base.qcow2,backing_fmt=qcow2")
        .unwrap();
    create_writer(Format::Qcow2, &mut opts).unwrap();
}

#[test]
fn an_unknown_key_lists_the_valid_ones() {
    for f in WRITABLE {
        let mut opts = WriterOptions::default();
        opts.set("bogus", "1");
        let e = create_writer(f, &mut opts).err().unwrap().to_string();
        assert!(e.contains("'bogus'"), "{e}");
        for o in writer_options(f).unwrap() {
            assert!(e.contains(o.name), "{f}: {e} lacks {}", o.name);
        }
    }
    // compress is qcow2's (the CLI's -c), not VMDK's: VMDK compression is a subformat.
    let mut opts = WriterOptions::default();
    opts.set("compress", "on");
    assert!(create_writer(Format::Qcow2, &mut opts).is_ok());
    let mut opts = WriterOptions::default();
    opts.set("compress", "on");
    assert!(create_writer(Format::Vmdk, &mut opts).is_err());
    assert!(writer_options(Format::Ova).is_none());
}
