//! What a compromised backup host, or anyone who can name a file in a backed-up folder,
//! can make a restore do: nothing outside its target (issue 15, items 1 and 2). Each test
//! is named after the hole it pins.

mod common;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::attack::{entry, Attacker, Planted};
use common::*;
use custos_model::PathBytes;
use custos_sources::files::EntryKind;

/// A file outside every target, that a restore must leave exactly as it is.
struct Bystander {
    dir: std::path::PathBuf,
}

impl Bystander {
    fn new(t: &T) -> Bystander {
        let dir = t.path("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("patient.txt"), b"not the restore's to touch").unwrap();
        std::fs::set_permissions(
            dir.join("patient.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        Bystander { dir }
    }

    fn assert_untouched(&self) {
        let f = self.dir.join("patient.txt");
        assert_eq!(
            std::fs::read(&f).unwrap(),
            b"not the restore's to touch",
            "a restore rewrote a file outside its target"
        );
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            0o600,
            "a restore chmod-ed a file outside its target"
        );
        let d = std::fs::symlink_metadata(&self.dir).unwrap();
        assert!(d.is_dir(), "a restore replaced a folder outside its target");
        assert_eq!(d.mode() & 0o7777, 0o700);
        if is_root() {
            assert_eq!(
                (m.uid(), m.gid()),
                (0, 0),
                "a restore chown-ed a file outside"
            );
            assert_eq!(
                (d.uid(), d.gid()),
                (0, 0),
                "a restore chown-ed a folder outside"
            );
        }
        let names: Vec<_> = std::fs::read_dir(&self.dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "a restore created files outside its target");
    }
}

fn name(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

#[test]
fn restore_escapes_its_target_through_colliding_names() {
    // `s\xfe` and `s\xff` were both stored as `s\u{FFFD}`: one path held twice, a link and
    // a folder, and the restore followed the link to chown and chmod what lay outside.
    let t = T::new();
    let outside = Bystander::new(&t);
    let src = t.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink(&outside.dir, src.join(name(b"s\xfe"))).unwrap();
    let planted = src.join(name(b"s\xff"));
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(planted.join("patient.txt"), b"planted").unwrap();
    std::fs::set_permissions(
        planted.join("patient.txt"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    if is_root() {
        std::os::unix::fs::lchown(&planted, Some(1234), Some(1234)).unwrap();
        std::os::unix::fs::lchown(planted.join("patient.txt"), Some(1234), Some(1234)).unwrap();
    }
    // Names that are not UTF-8 back up and restore as they are, not renamed.
    std::fs::write(src.join(name(b"caf\xe9.txt")), b"latin-1 name").unwrap();
    std::os::unix::fs::symlink(name(b"caf\xe9.txt"), src.join("link-to-latin1")).unwrap();
    let want = describe(&src);

    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("out");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(
        describe(&out),
        want,
        "the restored tree differs from the source"
    );
    assert!(out
        .join(name(b"s\xfe"))
        .symlink_metadata()
        .unwrap()
        .is_symlink());
    assert_eq!(
        std::fs::read(out.join(name(b"s\xff")).join("patient.txt")).unwrap(),
        b"planted"
    );
    outside.assert_untouched();
    // `ls` names them exactly, escaped: one line each.
    let listed = t.ok(&["ls", "latest"]);
    assert!(
        listed.contains("s\\xfe") && listed.contains("s\\xff"),
        "{listed}"
    );
    assert!(listed.contains("caf\\xe9.txt"), "{listed}");
}

#[test]
fn a_manifest_holding_a_path_twice_is_refused_before_anything_is_written() {
    // Whatever the walk does, a manifest is a backup key's to write: the restore itself
    // must refuse one that names a path twice, or a path under a link or a file.
    let mut t = T::new();
    t.add_key("backup", "backup host", &[]);
    let outside = Bystander::new(&t);
    let attacker = Attacker::open(&t, "backup host");
    let link = |path: &[u8]| {
        let mut e = entry(path, EntryKind::Symlink, 0o777);
        e.target = Some(PathBytes::from(outside.dir.as_path()));
        e
    };
    let cases: Vec<(&str, Vec<Planted>)> = vec![
        (
            "twice",
            vec![
                (entry(b"s", EntryKind::Dir, 0o777), None),
                (entry(b"s/patient.txt", EntryKind::File, 0o777), Some(b"x")),
                (link(b"s"), None),
            ],
        ),
        (
            "not a folder",
            vec![
                (link(b"s"), None),
                (entry(b"s/patient.txt", EntryKind::File, 0o777), Some(b"x")),
            ],
        ),
        (
            "unsafe path",
            vec![(
                entry(b"../outside/patient.txt", EntryKind::File, 0o777),
                Some(b"x"),
            )],
        ),
    ];
    for (why, entries) in cases {
        let snap = attacker.plant_files(entries).to_hex();
        let out = t.path(&format!("out-{}", why.replace(' ', "-")));
        let err = t.fails(
            &[
                "restore",
                "files",
                &snap[..12],
                "--to",
                out.to_str().unwrap(),
            ],
            14,
        );
        assert!(err.contains(why), "{why}: {err}");
        assert!(
            !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
            "{why}: something was written before the refusal"
        );
        outside.assert_untouched();
    }
}

#[test]
fn restore_overwrite_follows_symlinks_already_in_the_target() {
    let t = T::new();
    let outside = Bystander::new(&t);
    let src = t.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/patient.txt"), b"from the backup").unwrap();
    std::fs::write(src.join("patient.txt"), b"top level, from the backup").unwrap();
    std::fs::write(src.join("shared.txt"), b"shared, from the backup").unwrap();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let want = describe(&src);

    // Someone who can write the target put links in it: a folder and a file of the
    // snapshot's names point outside.
    let prepare = |out: &Path| {
        std::fs::create_dir_all(out).unwrap();
        std::os::unix::fs::symlink(&outside.dir, out.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.dir.join("patient.txt"), out.join("patient.txt"))
            .unwrap();
    };
    let out = t.path("out-overwrite");
    prepare(&out);
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(describe(&out), want);
    assert!(std::fs::symlink_metadata(out.join("sub")).unwrap().is_dir());
    outside.assert_untouched();

    // A hard link to a file outside: a delta restore replaces the name, it does not write
    // through it into the other file.
    let out = t.path("out-delta");
    prepare(&out);
    let elsewhere = t.path("elsewhere.txt");
    std::fs::write(&elsewhere, b"another file sharing the inode").unwrap();
    std::fs::hard_link(&elsewhere, out.join("shared.txt")).unwrap();
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--delta",
    ]);
    assert_eq!(describe(&out), want);
    assert_eq!(
        std::fs::read(&elsewhere).unwrap(),
        b"another file sharing the inode",
        "a delta restore wrote through a hard link"
    );
    outside.assert_untouched();
}
