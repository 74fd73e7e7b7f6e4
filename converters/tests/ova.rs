#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;
use std::sync::Arc;

use imgshift_converters::formats::ova::OvaPackage;
use imgshift_converters::{FileStorage, Format, OpenGate, open_path};
use util::*;

const MIB: u64 = 1 << 20;

/// One `References/File` + `DiskSection/Disk` + hardware item.
struct DiskSpec<'a> {
    id: &'a str,
    href: &'a str,
    capacity: &'a str,
    units: Option<&'a str>,
    format: Option<&'a str>,
    address: u32,
    extra_file_attrs: &'a str,
}

fn descriptor(disks: &[DiskSpec<'_>]) -> String {
    let mut files = String::new();
    let mut disk_elems = String::new();
    let mut items = String::new();
    for (i, d) in disks.iter().enumerate() {
        files.push_str(&format!(
            "    <File ovf:id=\"file{i}\" ovf:href=\"{}\" {}/>\n",
            d.href, d.extra_file_attrs
        ));
        let units = d
            .units
            .map(|u| format!(" ovf:capacityAllocationUnits=\"{u}\""))
            .unwrap_or_default();
        let fmt = d
            .format
            .map(|f| format!(" ovf:format=\"{f}\""))
            .unwrap_or_default();
        disk_elems.push_str(&format!(
            "    <Disk ovf:diskId=\"{}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"{}\"{units}{fmt}/>\n",
            d.id, d.capacity
        ));
        items.push_str(&format!(
            "      <Item>\n        <rasd:AddressOnParent>{}</rasd:AddressOnParent>\n        \
             <rasd:ElementName>disk{i}</rasd:ElementName>\n        \
             <rasd:HostResource>ovf:/disk/{}</rasd:HostResource>\n        \
             <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>3</rasd:Parent>\n        \
             <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            d.address,
            d.id,
            10 + i
        ));
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="2.0" xmlns="http://schemas.dmtf.org/ovf/envelope/2"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
{files}  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
{disk_elems}  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A VM</Info>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
{items}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// Writes a tar with `members` (name, contents file or bytes) in order.
fn make_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
}

#[test]
fn opens_the_boot_disk_and_every_member_format() {
    let d = tmpdir();
    let raw1 = p(d.path(), "one.raw");
    let raw2 = p(d.path(), "two.raw");
    make_raw(&raw1, 3 * MIB, &[(0, MIB)], &[]);
    make_raw(&raw2, 5 * MIB + 512, &[(MIB, 2 * MIB)], &[]);
    // a VHD and a VDI member made by qemu-img from raw2
    let vhd = p(d.path(), "two.vhd");
    let vdi = p(d.path(), "two.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "force_size=on",
        raw2.to_str().unwrap(),
        vhd.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        raw2.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let cap2 = (5 * MIB + 512).to_string();
    let specs = [
        DiskSpec {
            id: "d1",
            href: "one.img",
            capacity: "3",
            units: Some("byte * 2^20"),
            format: None,
            address: 1,
            extra_file_attrs: "",
        },
        // boot disk: address 0
        DiskSpec {
            id: "d2",
            href: "two.img",
            capacity: &cap2,
            units: None,
            format: Some("http://example.com/raw"),
            address: 0,
            extra_file_attrs: "",
        },
        DiskSpec {
            id: "d3",
            href: "two.vhd",
            capacity: &cap2,
            units: Some("byte"),
            format: Some("http://technet.microsoft.com/en-us/library/bb676673.aspx"),
            address: 2,
            extra_file_attrs: "",
        },
        DiskSpec {
            id: "d4",
            href: "two.vdi",
            capacity: &cap2,
            units: None,
            format: Some("http://www.virtualbox.org/manual/ch12.html#vdi"),
            address: 3,
            extra_file_attrs: "",
        },
    ];
    let ova = p(d.path(), "vm.ova");
    make_tar(
        &ova,
        &[
            ("vm.ovf", descriptor(&specs).into_bytes()),
            ("vm.mf", b"SHA256(one.img)= 00\n".to_vec()),
            ("one.img", std::fs::read(&raw1).unwrap()),
            ("two.img", std::fs::read(&raw2).unwrap()),
            ("two.vhd", std::fs::read(&vhd).unwrap()),
            ("two.vdi", std::fs::read(&vdi).unwrap()),
        ],
    );
    // probed as OVA; the boot disk is d2 (address 0)
    let out = p(d.path(), "boot.raw");
    imgshift_convert(&ova, None, &out, Format::Raw, "");
    assert_same(&raw2, "raw", &out, "raw");

    let pkg = OvaPackage::open(Arc::new(FileStorage::open(&ova).unwrap())).unwrap();
    let disks = pkg.disks();
    let ids: Vec<_> = disks.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["d2", "d1", "d3", "d4"]);
    assert_eq!(disks[1].capacity, 3 * MIB);
    assert_eq!(disks[1].format, None);
    assert_eq!(disks[2].format, Some(Format::Vpc));
    assert_eq!(disks[3].format, Some(Format::Vdi));
    assert_eq!(disks[0].size, 5 * MIB + 512);
    for (i, want) in [(1, &raw1), (2, &raw2), (3, &raw2)] {
        let src = pkg.open_disk(i, &OpenGate::new()).unwrap();
        // write the member's content out and compare
        let dst = p(d.path(), &format!("m{i}.raw"));
        let mut buf = vec![0u8; src.virtual_size() as usize];
        src.read_at(&mut buf, 0).unwrap();
        std::fs::write(&dst, &buf).unwrap();
        assert_same(want, "raw", &dst, "raw");
    }
    assert!(pkg.open_disk(9, &OpenGate::new()).is_err());
}

fn expect_refused(d: &Path, name: &str, members: &[(&str, Vec<u8>)], needle: &str) {
    let ova = p(d, name);
    make_tar(&ova, members);
    let r = open_path(&ova, Some(Format::Ova), &OpenGate::new());
    match r {
        Ok(_) => panic!("{name} must be refused"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{name}: '{e}' does not mention '{needle}'"
        ),
    }
}

#[test]
fn refuses_bad_packages() {
    let d = tmpdir();
    let disk = vec![7u8; 2 * MIB as usize];
    let good = |href: &'static str, cap: &'static str, extra: &'static str| {
        descriptor(&[DiskSpec {
            id: "d",
            href,
            capacity: cap,
            units: Some("byte * 2^20"),
            format: None,
            address: 0,
            extra_file_attrs: extra,
        }])
        .into_bytes()
    };
    expect_refused(
        d.path(),
        "first.ova",
        &[
            ("disk.img", disk.clone()),
            ("vm.ovf", good("disk.img", "2", "")),
        ],
        "first member",
    );
    expect_refused(
        d.path(),
        "dotdot.ova",
        &[
            ("vm.ovf", good("../disk.img", "2", "")),
            ("disk.img", disk.clone()),
        ],
        "not a member",
    );
    expect_refused(
        d.path(),
        "abs.ova",
        &[
            ("vm.ovf", good("/etc/passwd", "2", "")),
            ("disk.img", disk.clone()),
        ],
        "not a member",
    );
    expect_refused(
        d.path(),
        "url.ova",
        &[
            ("vm.ovf", good("http://example.com/x.img", "2", "")),
            ("disk.img", disk.clone()),
        ],
        "not a member",
    );
    expect_refused(
        d.path(),
        "missing.ova",
        &[
            ("vm.ovf", good("other.img", "2", "")),
            ("disk.img", disk.clone()),
        ],
        "missing",
    );
    expect_refused(
        d.path(),
        "capacity.ova",
        &[
            ("vm.ovf", good("disk.img", "3", "")),
            ("disk.img", disk.clone()),
        ],
        "capacity",
    );
    expect_refused(
        d.path(),
        "gzip.ova",
        &[
            ("vm.ovf", good("disk.img", "2", "ovf:compression=\"gzip\"")),
            ("disk.img", disk.clone()),
        ],
        "compressed",
    );
    expect_refused(
        d.path(),
        "size.ova",
        &[
            ("vm.ovf", good("disk.img", "2", "ovf:size=\"12\"")),
            ("disk.img", disk.clone()),
        ],
        "ovf:size",
    );
    expect_refused(
        d.path(),
        "dup.ova",
        &[
            ("vm.ovf", good("disk.img", "2", "")),
            ("disk.img", disk.clone()),
            ("disk.img", disk.clone()),
        ],
        "twice",
    );
    let laughs = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Envelope>&lol2;</Envelope>"#;
    expect_refused(
        d.path(),
        "dtd.ova",
        &[("vm.ovf", laughs.to_vec()), ("disk.img", disk.clone())],
        "XML",
    );
    expect_refused(
        d.path(),
        "notxml.ova",
        &[("vm.ovf", b"\xff\xfe garbage".to_vec())],
        "UTF-8",
    );
    // not a tar at all
    let junk = p(d.path(), "junk.ova");
    std::fs::write(&junk, vec![0x55u8; 4096]).unwrap();
    assert!(open_path(&junk, Some(Format::Ova), &OpenGate::new()).is_err());
}

/// A descriptor with one raw disk of `cap` bytes in member `href`.
fn one_disk(href: &str, cap: &str) -> Vec<u8> {
    descriptor(&[DiskSpec {
        id: "d",
        href,
        capacity: cap,
        units: Some("byte"),
        format: None,
        address: 0,
        extra_file_attrs: "",
    }])
    .into_bytes()
}

#[test]
fn refuses_an_ova_nested_in_an_ova() {
    let d = tmpdir();
    let inner = p(d.path(), "inner.ova");
    let disk = vec![1u8; MIB as usize];
    make_tar(
        &inner,
        &[
            ("a.ovf", one_disk("disk.img", "1048576")),
            ("disk.img", disk),
        ],
    );
    let inner_bytes = std::fs::read(&inner).unwrap();
    let cap = inner_bytes.len().to_string();
    expect_refused(
        d.path(),
        "outer.ova",
        &[
            ("b.ovf", one_disk("inner.ova", &cap)),
            ("inner.ova", inner_bytes),
        ],
        "itself an OVA",
    );
}

/// Sets the size field of the tar header at `offset` of `path` (recomputing its checksum).
fn set_tar_size(path: &Path, offset: u64, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = tar::Header::new_old();
    f.read_exact_at(h.as_mut_bytes(), offset).unwrap();
    h.set_size(size);
    h.set_cksum();
    f.write_all_at(h.as_bytes(), offset).unwrap();
}

/// A PAX extended header ('x') member holding `records`, as a 512-byte-padded block run.
fn pax_member(records: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        // "%d %s=%s\n", the length counting its own digits.
        let rest = format!(" {k}={v}\n");
        let mut n = rest.len() + 1;
        while (n.to_string().len() + rest.len()) != n {
            n += 1;
        }
        body.extend_from_slice(format!("{n}{rest}").as_bytes());
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(body.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&body);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

const LONG_OVF: &str = "a-descriptor-name-longer-than-the-100-bytes-of-a-ustar-name-field-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.ovf";

#[test]
fn a_huge_extension_header_is_refused_before_it_is_read() {
    let d = tmpdir();
    let disk = vec![7u8; MIB as usize];
    // A GNU long name ('L') before the descriptor: tar::Builder writes one for a name over 100 bytes.
    let gnu = p(d.path(), "gnu.ova");
    make_tar(
        &gnu,
        &[
            (LONG_OVF, one_disk("disk.img", "1048576")),
            ("disk.img", disk.clone()),
        ],
    );
    // A PAX extended header ('x') naming the descriptor.
    let pax = p(d.path(), "pax.ova");
    let mut bytes = pax_member(&[("path", "vm.ovf")]);
    make_tar(
        &p(d.path(), "rest.tar"),
        &[
            ("short.ovf", one_disk("disk.img", "1048576")),
            ("disk.img", disk),
        ],
    );
    bytes.extend_from_slice(&std::fs::read(p(d.path(), "rest.tar")).unwrap());
    std::fs::write(&pax, bytes).unwrap();

    const CLAIM: u64 = 6 << 30;
    for (ova, what) in [
        (&gnu, "GNU long name ('L')"),
        (&pax, "PAX extended header ('x')"),
    ] {
        // Both open as made.
        let src = open_path(ova, Some(Format::Ova), &OpenGate::new()).unwrap();
        assert_eq!(src.virtual_size(), MIB);
        // The extension member claims 6 GiB, and the file really holds that many (sparse) bytes after it, so a
        // reader that believed the claim would allocate 6 GiB.
        set_tar_size(ova, 0, CLAIM);
        let f = std::fs::OpenOptions::new().write(true).open(ova).unwrap();
        f.set_len(512 + CLAIM + 1024).unwrap();
        let owned = ova.to_path_buf();
        let (r, work) = file_work(what, move || {
            open_path(&owned, Some(Format::Ova), &OpenGate::new()).map(|_| ())
        });
        let e = r.expect_err("a 6 GiB extension header must be refused");
        // Refused from the member's header: the 6 GiB it claims are never read (nor skipped through by reading).
        eprintln!("{what}: {work:?}");
        work.assert_at_most(what, 1 << 20, 64);
        assert_eq!(e.kind(), imgshift_converters::ErrorKind::Limit, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "ova image exceeds a limit: the {what} member at offset 0 is {CLAIM} bytes (at most 65536)"
            )
        );
    }
}

#[test]
fn long_names_and_pax_sizes_name_and_size_members() {
    let d = tmpdir();
    let disk = vec![9u8; 2 * MIB as usize];
    let href = format!("{}/disk.img", "d".repeat(150));
    let ova = p(d.path(), "vm.ova");
    // The descriptor's long name comes in a GNU 'L' member (tar::Builder writes one).
    make_tar(&ova, &[(LONG_OVF, one_disk(&href, "2097152"))]);
    let mut bytes = std::fs::read(&ova).unwrap();
    // Cut the end-of-archive blocks, then the disk: a PAX header gives its name and size; the ustar header's
    // own name and size field (0) are overridden.
    let end = bytes.len() - 1024;
    bytes.truncate(end);
    let size = disk.len().to_string();
    bytes.extend_from_slice(&pax_member(&[("path", &href), ("size", &size)]));
    let mut h = tar::Header::new_ustar();
    h.set_path("short.img").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_cksum();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&disk);
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(&ova, bytes).unwrap();

    let pkg = OvaPackage::open(Arc::new(FileStorage::open(&ova).unwrap())).unwrap();
    assert_eq!(pkg.descriptor_name(), LONG_OVF);
    let disks = pkg.disks();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].file_name, href);
    assert_eq!(disks[0].size, 2 * MIB);
    let src = pkg.open_boot_disk(&OpenGate::new()).unwrap();
    let mut got = vec![0u8; disk.len()];
    src.read_at(&mut got, 0).unwrap();
    assert_eq!(got, disk);
}
