//! Files named inside images are opened only as the gate checked them: regular files, without blocking, and not
//! through a symlink swapped in after the check.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod util;

use std::path::Path;
use std::sync::mpsc;

use imgshift_converters::{ErrorKind, Format, OpenGate, open_path};
use util::*;

const MIB: u64 = 1 << 20;

/// A qcow2 of 1 MiB at `top` whose backing file is `backing` (raw), made without qemu-img opening it.
fn qcow2_over(top: &Path, backing: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        "raw",
        top.to_str().unwrap(),
        "1M",
    ]);
}

#[test]
fn a_fifo_named_as_backing_file_is_refused_without_hanging() {
    let d = tmpdir();
    let fifo = p(d.path(), "base.raw");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let top = p(d.path(), "top.qcow2");
    qcow2_over(&top, "base.raw");

    let (tx, rx) = mpsc::channel();
    let opener_top = top.clone();
    let opener = std::thread::spawn(move || {
        let r = open_path(&opener_top, Some(Format::Qcow2), &OpenGate::new());
        let _ = tx.send(r.err().map(|e| (e.kind(), e.to_string())));
    });
    let outcome = match rx.recv_timeout(HANG_GUARD) {
        Ok(outcome) => outcome,
        Err(_) => {
            // A regression blocks in open(2) until a writer appears: be that writer, so the test fails, not hangs.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
            let _ = opener.join();
            panic!(
                "opening a qcow2 whose backing file is a FIFO hung (blocked for {} s)",
                HANG_GUARD.as_secs()
            );
        }
    };
    opener.join().unwrap();
    let (kind, text) = outcome.expect("a FIFO backing file must be refused");
    assert_eq!(kind, ErrorKind::Denied, "{text}");
    let canon = fifo.canonicalize().unwrap();
    assert_eq!(
        text,
        format!(
            "backing file 'base.raw': {} is not a regular file",
            canon.display()
        )
    );
}

#[test]
fn a_symlink_inside_the_folder_opens_the_file_it_names() {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    make_raw(&base, MIB, &[(0, 64 << 10)], &[]);
    std::os::unix::fs::symlink("base.raw", p(d.path(), "link.raw")).unwrap();
    let top = p(d.path(), "top.qcow2");
    qcow2_over(&top, "link.raw");

    let src = open_path(&top, Some(Format::Qcow2), &OpenGate::new()).unwrap();
    let mut got = vec![0u8; MIB as usize];
    src.read_at(&mut got, 0).unwrap();
    assert_eq!(got, std::fs::read(&base).unwrap());

    // What is opened is the canonical path the gate checked, not the link.
    let gate = OpenGate::new().enter_top(&top);
    let (storage, _) = gate.open(&top, "link.raw", "backing file").unwrap();
    assert_eq!(storage.path(), Some(base.canonicalize().unwrap().as_path()));
}

#[test]
fn a_symlink_out_of_the_folder_is_refused() {
    let d = tmpdir();
    let images = p(d.path(), "images");
    std::fs::create_dir(&images).unwrap();
    let outside = p(d.path(), "secret.raw");
    make_raw(&outside, MIB, &[(0, 4096)], &[]);
    std::os::unix::fs::symlink(&outside, p(&images, "base.raw")).unwrap();
    let top = p(&images, "top.qcow2");
    qcow2_over(&top, "base.raw");

    let e = open_path(&top, Some(Format::Qcow2), &OpenGate::new())
        .err()
        .expect("a backing file linking out of the folder must be refused");
    assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
    assert!(
        e.to_string()
            .contains("backing file 'base.raw' refused: it is outside the image's folder"),
        "{e}"
    );
}
