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

/// A keyring link as a backup key can write one: sealed with the meta key it holds, but
/// naming a key pair of the attacker's and signed, if at all, by no authority.
fn plant_keyring_link(a: &Attacker, generation: u32) {
    use custos_repo::keyring::{link_path, Link};
    let (_, public) = custos_crypto::wrap::generate();
    let l = Link {
        generation,
        created: chrono::Utc::now(),
        public: public.0.to_vec(),
        prev_public: a.repo.keys.public.0.to_vec(),
        wrapped: vec![0; 80],
        mac: "00".repeat(32),
        sig: hex_of(&custos_crypto::sign::sign(
            &custos_crypto::sign::generate(),
            b"not the authority",
        )),
    };
    let mut aad = b"custos keyring v1".to_vec();
    aad.extend_from_slice(&generation.to_le_bytes());
    let sealed = custos_crypto::aead::seal(
        &a.repo.keys.meta_key,
        &aad,
        &custos_repo::format::to_zjson(&l),
    );
    a.repo
        .storage
        .put(
            &link_path(generation),
            &sealed,
            custos_storage::PutMode::CreateOnly,
        )
        .unwrap();
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_backup_key_can_replace_the_data_key_pair() {
    // A planted generation made every later backup decryptable by the attacker. Now a
    // generation not signed by the repository's authority stops every key that meets it.
    let mut t = T::new();
    t.add_key("backup", "stolen host", &[]);
    t.add_key("backup", "other host", &[]);
    let src = t.path("src");
    make_tree(&src, 3, 10, 20_000);
    plant_keyring_link(&Attacker::open(&t, "stolen host"), 1);
    assert!(
        std::fs::read_dir(std::path::Path::new(&t.repo).join("snapshots"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    );
    let other = t.with_password("other host");
    let err = other.fails(&["backup", "files", src.to_str().unwrap()], 14);
    assert!(
        err.contains("keyring generation 1") && err.contains("not signed"),
        "{err}"
    );
    // The restore key sets it aside, says so, and still works: a restore at 3 a.m. must
    // not depend on a clean keyring. verify names it.
    let out = t.run(&["snapshots", "--json"]);
    assert!(out.status.success());
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("keyring generation 1") && warned.contains("set aside"),
        "{warned}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let err = t.fails(&["verify"], 14);
    assert!(err.contains("keyring generation 1"), "{err}");
}

#[test]
fn a_keyring_object_that_does_not_decode_costs_restores_nothing() {
    // Bytes that are not a link at all (storage can write any; any key can create the next
    // generation's name) stopped every command, restores included, before the key was
    // even applied. Now it is handled as a link that does not verify: a key that would
    // write with the generations past it stops, a restore key sets it aside and reads on,
    // and verify names it. A gap in the generations is the same.
    let mut t = T::new();
    t.add_key("backup", "backup host", &[]);
    let src = t.path("src");
    make_tree(&src, 4, 8, 20_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let tree = describe(&src);
    let keyring = std::path::Path::new(&t.repo).join("keyring");
    std::fs::create_dir_all(&keyring).unwrap();
    for (planted, says) in [
        ("00000001", "keyring generation 1"),
        ("00000002", "keyring generation 1 is missing"),
    ] {
        std::fs::write(keyring.join(planted), b"not a link").unwrap();
        let backup = t.with_password("backup host");
        let err = backup.fails(&["backup", "files", src.to_str().unwrap()], 14);
        assert!(
            err.contains(says) && err.contains("do not back up"),
            "{planted}: {err}"
        );
        let out = t.run(&[
            "restore",
            "files",
            "latest",
            "--to",
            t.path(planted).to_str().unwrap(),
        ]);
        let warned = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{planted}: {warned}");
        assert!(
            warned.contains(says) && warned.contains("set aside"),
            "{planted}: {warned}"
        );
        assert_eq!(describe(&t.path(planted)), tree);
        let err = t.fails(&["verify"], 14);
        assert!(err.contains(says), "{planted}: {err}");
        std::fs::remove_file(keyring.join(planted)).unwrap();
    }
    t.with_password("backup host")
        .ok(&["backup", "files", src.to_str().unwrap()]);
}

#[test]
fn a_rotation_by_a_restore_key_is_taken_by_backup_keys_and_a_planted_rewrap_is_refused() {
    let mut t = T::new();
    t.add_key("backup", "stolen host", &[]);
    t.add_key("backup", "other host", &[]);
    let src = t.path("src");
    make_tree(&src, 4, 10, 20_000);
    t.ok(&["key", "rotate", "--rewrap"]);
    let other = t.with_password("other host");
    other.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("out");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(describe(&out), describe(&src));

    // The stolen key replaces the re-wrap table with its own: every key refuses it.
    let a = Attacker::open(&t, "stolen host");
    let table = custos_repo::keyring::Rewrap {
        generation: 1,
        keys: Default::default(),
        sig: String::new(),
    };
    let sealed = custos_crypto::aead::seal(
        &a.repo.keys.meta_key,
        b"custos keyring rewrap v1",
        &custos_repo::format::to_zjson(&table),
    );
    a.repo
        .storage
        .put(
            &custos_repo::keyring::rewrap_path(1),
            &sealed,
            custos_storage::PutMode::Overwrite,
        )
        .unwrap();
    // A backup key never reads the table (it decrypts nothing, and what it writes is
    // wrapped to the newest signed generation): it goes on.
    other.ok(&["backup", "files", src.to_str().unwrap()]);
    // The restore key opens each object with its own wrapping first (its earlier secret
    // still opens them) and does not need the table: the restore is whole.
    let out2 = t.path("out2");
    let o = t.run(&["restore", "files", "latest", "--to", out2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(describe(&out2), describe(&src));
    // verify reads the table, sets it aside and names it.
    let err = t.fails(&["verify"], 14);
    assert!(
        err.contains("re-wrap") && err.contains("not signed"),
        "{err}"
    );
}

#[test]
fn a_backup_key_can_create_more_backup_keys() {
    let mut t = T::new();
    t.add_key("backup", "backup host", &[]);
    let mut b = t.with_password("backup host");
    b.set("CUSTOS_NEW_PASSWORD", "a key of the attacker's");
    let err = b.fails(&["key", "add", "--role", "backup"], 13);
    assert!(err.contains("backup role"), "{err}");
    assert_eq!(t.json(&["key", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn a_damaged_key_file_is_reported_as_a_wrong_password() {
    let t = T::new();
    let keys = std::path::Path::new(&t.repo).join("keys");
    let file = std::fs::read_dir(&keys)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let data = v["data"].as_str().unwrap().to_string();
    let flipped = if data.as_bytes()[20] == b'A' {
        'B'
    } else {
        'A'
    };
    v["data"] = format!("{}{}{}", &data[..20], flipped, &data[21..]).into();
    std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = t.fails(&["snapshots"], 14);
    assert!(err.contains("damaged"), "{err}");
    // A wrong password on an intact repository is still exit 12.
    let t2 = T::new();
    t2.with_password("wrong").fails(&["snapshots"], 12);
}

/// Appends `entry` to the trail as the attacker's key, or as `as_key` with the attacker's
/// signing key.
fn forge_entry(a: &mut Attacker, mutate: impl FnOnce(&mut custos_repo::trail::Entry)) {
    let mut e = custos_repo::trail::Entry {
        time: chrono::Utc::now(),
        role: "backup".into(),
        key: a.repo.key_id,
        host: "attacker".into(),
        user: "mallory".into(),
        command: "backup files".into(),
        touched: serde_json::Value::Null,
        result: "ok".into(),
        introduces: None,
        introduces_role: None,
        authority: None,
    };
    mutate(&mut e);
    // Written as the object itself, not through custos's writer (which dates an entry no
    // earlier than the one before): an attacker writes what it likes.
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let dir = std::path::Path::new(&a.repo.storage.location()).join("audit");
    let last = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| u64::from_str_radix(e.unwrap().file_name().to_str().unwrap(), 16).unwrap())
        .max()
        .unwrap();
    let seq = last + 1;
    let prev = *blake3::hash(&std::fs::read(dir.join(format!("{last:016x}"))).unwrap()).as_bytes();
    let mut aad = b"custos trail v1".to_vec();
    aad.extend_from_slice(&seq.to_le_bytes());
    let sealed = custos_crypto::aead::seal(
        &a.repo.keys.meta_key,
        &aad,
        &serde_json::to_vec(&e).unwrap(),
    );
    let mut msg = aad.clone();
    msg.extend_from_slice(&prev);
    msg.extend_from_slice(&a.repo.key_id.0 .0);
    msg.extend_from_slice(&sealed);
    let sig = custos_crypto::sign::sign(a.repo.keys.sign_seed.as_ref().unwrap(), &msg);
    let stored = serde_json::json!({
        "version": 1, "seq": seq, "prev": hex_of(&prev), "key": a.repo.key_id,
        "entry": b64(&sealed), "sig": b64(&sig),
    });
    std::fs::write(
        dir.join(format!("{seq:016x}")),
        serde_json::to_vec(&stored).unwrap(),
    )
    .unwrap();
}

#[test]
fn trail_entries_can_be_forged_in_another_keys_name() {
    let restore_key = |t: &T| -> custos_model::KeyId {
        let keys = t.json(&["key", "list"]);
        let k = keys
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["current"] == true)
            .unwrap();
        serde_json::from_value(k["id"].clone()).unwrap()
    };
    type Forgery = Box<dyn Fn(&mut Attacker, custos_model::KeyId)>;
    let cases: Vec<(&str, Forgery)> = vec![
        (
            "says it is by key",
            Box::new(|a, rk| {
                forge_entry(a, |e| {
                    e.key = rk;
                    e.role = "restore".into();
                    e.command = "forget".into();
                })
            }),
        ),
        (
            "says it is by a restore key",
            Box::new(|a, _| forge_entry(a, |e| e.role = "restore".into())),
        ),
        (
            "cannot create one",
            Box::new(|a, rk| {
                // Introduce a new signing key for the restore key's id, then sign as it.
                let seed = custos_crypto::sign::generate();
                let public = hex_of(&custos_crypto::sign::public_of(&seed));
                forge_entry(a, |e| {
                    e.command = "key add".into();
                    e.introduces = Some((rk, public));
                    e.introduces_role = Some("restore".into());
                });
                a.repo.key_id = rk;
                a.repo.keys.sign_seed = Some(seed);
                forge_entry(a, |e| {
                    e.key = rk;
                    e.role = "restore".into();
                    e.command = "key remove".into();
                });
            }),
        ),
        (
            "times never go backwards",
            Box::new(|a, _| {
                forge_entry(a, |e| {
                    e.time = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z")
                        .unwrap()
                        .into()
                })
            }),
        ),
    ];
    for (why, forge) in cases {
        let mut t = T::new();
        t.add_key("backup", "backup host", &[]);
        let rk = restore_key(&t);
        let src = t.path("src");
        make_tree(&src, 5, 3, 1000);
        t.with_password("backup host")
            .ok(&["backup", "files", src.to_str().unwrap()]);
        t.ok(&["audit", "verify"]);
        let before = t.json(&["audit", "log"]).as_array().unwrap().len() as u64;
        let mut a = Attacker::open(&t, "backup host");
        forge(&mut a, rk);
        eprintln!("case: {why}");
        let err = t.fails(&["audit", "verify"], 14);
        assert!(
            err.contains(&format!("first bad entry is {}", before + 2)) && err.contains(why),
            "{why}: {err}"
        );
    }
}

#[test]
fn ls_and_audit_log_print_control_characters_from_names_raw() {
    let mut t = T::new();
    t.add_key("backup", "backup host", &[]);
    let src = t.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("bill\x1b[2J\n-rw-r--r-- 1 forged.pdf"), b"x").unwrap();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let mut a = Attacker::open(&t, "backup host");
    forge_entry(&mut a, |e| {
        e.host = "db-1\x1b]0;owned\x07\n     9 forged line".into()
    });
    for args in [
        vec!["ls", "latest"],
        vec!["audit", "log"],
        vec!["snapshots"],
    ] {
        let out = t.run(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains('\x1b') && !text.contains('\x07'),
            "{args:?} printed control characters: {text:?}"
        );
        assert!(!text.contains("\n     9 forged"), "{args:?}: {text}");
    }
    let listed = t.ok(&["ls", "latest"]);
    assert!(
        listed.contains("bill\\u{1b}[2J\\n-rw-r--r-- 1 forged.pdf"),
        "{listed}"
    );
}

/// Files whose content an attacker can guess (a template every clinic stores).
fn guessable_tree(root: &Path) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(root).unwrap();
    let mut out = vec![];
    for i in 0..3u64 {
        let mut data = vec![0u8; 1_500_000];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(40 + i),
            &mut data,
        );
        std::fs::write(root.join(format!("consent-form-{i}.pdf")), &data).unwrap();
        out.push(data);
    }
    out
}

#[test]
fn deduplication_can_be_poisoned() {
    // A backup key stored other bytes under the ids of content another host would back
    // up: that host skipped it, never stored its data, and a restore failed for good.
    let mut t = T::new();
    for (role, pw) in [
        ("backup", "attacker host"),
        ("backup", "clinic host"),
        ("backup", "second clinic"),
    ] {
        t.add_key(role, pw, &[]);
    }
    let src = t.path("src");
    let files = guessable_tree(&src);
    let a = Attacker::open(&t, "attacker host");
    let mut poisoned = 0u64;
    for data in &files {
        for chunk in
            a.repo
                .config
                .chunker
                .split(&data[..], Some(data.len() as u64), a.repo.cdc_seed())
        {
            let chunk = chunk.unwrap();
            let id = a.repo.keys.chunk_id(&chunk);
            a.store_blob(id, vec![0x66; chunk.len()]);
            poisoned += 1;
        }
    }

    // The clinic stores its own copy of every chunk: it trusts only its own packs and
    // those a restore key vouched for.
    let clinic = t.with_password("clinic host");
    let r = clinic.json(&["backup", "files", src.to_str().unwrap()]);
    assert!(
        r["stats"]["chunks_new"].as_u64().unwrap() > poisoned,
        "the backup skipped chunks another key planted: {r}"
    );
    let out = t.path("out");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(describe(&out), describe(&src));

    // A plain verify (no --read-data) checks what no restore key has vouched for, finds
    // the planted copies and records them; the clinic's packs are vouched for.
    let err = t.fails(&["verify"], 14);
    assert!(err.contains("does not match its id"), "{err}");
    let v = t.json(&["verify"]);
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["warnings"].to_string().contains("damaged cop"), "{v}");
    // Recorded copies are warnings, not errors: the data is intact elsewhere.
    let v = t.json(&["verify", "--read-data"]);
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");

    // A second host deduplicates against what the restore key vouched for.
    let second = t.with_password("second clinic");
    let r2 = second.json(&["backup", "files", src.to_str().unwrap()]);
    assert!(
        r2["stats"]["bytes_new"].as_u64().unwrap() < 10_000,
        "vouched data was stored again: {r2}"
    );
    // Prune drops the planted copies; everything still restores.
    t.ok(&["prune"]);
    let out2 = t.path("out2");
    t.ok(&["restore", "files", "latest", "--to", out2.to_str().unwrap()]);
    assert_eq!(describe(&out2), describe(&src));
    let v = t.json(&["verify", "--read-data"]);
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    assert!(!v["warnings"].to_string().contains("damaged cop"), "{v}");
}

#[test]
fn a_backup_that_meets_a_blob_that_failed_verification_stores_its_own_copy() {
    // A host's own pack damaged in storage: it used to skip those chunks for ever, as
    // they were in the index.
    let mut t = T::new();
    t.add_key("backup", "clinic host", &[]);
    let src = t.path("src");
    guessable_tree(&src);
    let clinic = t.with_password("clinic host");
    clinic.ok(&["backup", "files", src.to_str().unwrap()]);
    let pack = t
        .packs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    flip_byte(&pack, 100);
    let err = t.fails(&["verify", "--read-data"], 14);
    assert!(err.contains("does not match"), "{err}");
    // The next backup stores the damaged chunks again, and restores read them there.
    let r = clinic.json(&["backup", "files", src.to_str().unwrap()]);
    assert!(r["stats"]["chunks_new"].as_u64().unwrap() >= 1, "{r}");
    let out = t.path("out");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(describe(&out), describe(&src));
    t.ok(&["prune"]);
    t.ok(&["verify", "--read-data"]);
}

/// Every object of a local repository, with its owner's uid.
fn owners(repo: &str) -> Vec<(String, u32)> {
    let mut out = vec![];
    let mut stack = vec![std::path::PathBuf::from(repo)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            out.push((e.path().display().to_string(), m.uid()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn users_and_permissions_on_a_local_repository() {
    if !is_root() {
        eprintln!("not root: the ownership cases need root and the postgres user");
        return;
    }
    let postgres = custos_testkit::postgres_uid();
    // A repository root made: the postgres user is told at once, before any work.
    let mut t = T::bare();
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    t.run_as = Some("postgres".into());
    let err = t.fails(&["snapshots"], 13);
    assert!(
        err.contains("belongs to root") && err.contains("chown"),
        "{err}"
    );

    // `init --owner postgres`: root may work on it, and leaves only postgres's objects.
    let mut t = T::bare();
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Each user has its own cache folder (as each has its own home).
    t.set("CUSTOS_CACHE_DIR", t.path("cache-root").to_str().unwrap());
    t.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--owner",
        "postgres",
    ]);
    t.ok(&[
        "backup",
        "stream",
        "--name",
        "tf",
        "--command",
        "echo state",
    ]);
    t.ok(&["snapshots"]);
    let foreign: Vec<_> = owners(&t.repo)
        .into_iter()
        .filter(|(_, uid)| *uid != postgres)
        .collect();
    assert!(foreign.is_empty(), "objects root left behind: {foreign:?}");
    t.run_as = Some("postgres".into());
    let pg_cache = t.path("cache-postgres");
    std::fs::create_dir(&pg_cache).unwrap();
    std::os::unix::fs::chown(&pg_cache, Some(postgres), None).unwrap();
    t.set("CUSTOS_CACHE_DIR", pg_cache.to_str().unwrap());
    let out = t.run(&[
        "backup",
        "stream",
        "--name",
        "tf",
        "--command",
        "echo state",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = t.json(&["audit", "log"]);
    assert_eq!(log.as_array().unwrap().len(), 4, "{log}");
    t.ok(&["audit", "verify"]);

    // An append that fails is an error: the operation is not recorded, and says so.
    let audit = std::path::Path::new(&t.repo).join("audit");
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o500)).unwrap();
    let err = t.fails(&["snapshots"], 15);
    assert!(
        err.contains("operation trail could not be written"),
        "{err}"
    );
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// A cache folder other users could write into (a shared `CUSTOS_CACHE_DIR` made mode
/// 0777 or 0770) decides which files a backup reads again and which
/// chunks it believes stored: it is not used, with a warning; the backup still completes
/// and restores whole, and nothing is written into that folder.
#[test]
fn a_cache_folder_others_can_write_is_not_used() {
    let mut t = T::new();
    let src = t.path("src");
    make_tree(&src, 3, 10, 50_000);
    // World- and group-writable: not used, nothing written there, the backup completes.
    for mode in [0o777, 0o770] {
        let shared = t.path(&format!("shared-cache-{mode:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
        t.set("CUSTOS_CACHE_DIR", shared.to_str().unwrap());
        let out = t.run(&["backup", "files", src.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains("not used") && err.contains(&format!("mode {mode:o}")),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    }

    // Its own folder, 0700: used, without a word.
    let mine = t.path("my-cache");
    t.set("CUSTOS_CACHE_DIR", mine.to_str().unwrap());
    let out = t.run(&["backup", "files", src.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not used"));
    assert!(std::fs::read_dir(&mine).unwrap().count() > 0);
    t.restore_latest("out");
    assert_eq!(describe(&t.path("out")), describe(&src));
}

#[test]
fn a_lock_that_can_never_go_stale_does_not_hold_off_backups_for_good() {
    // Any key can write a lock. One dated in the year 9999 never aged past the stale limit,
    // and one naming pid 4294967295 (kill(2)'s -1: every process) on the backup's own host
    // always looked alive: either held off every backup and prune until someone deleted
    // the object by hand.
    let mut t = T::new();
    t.set("CUSTOS_HOST", "clinic-1");
    t.add_key("backup", "stolen host", &[]);
    let a = common::attack::Attacker::open(&t, "stolen host");
    let src = t.path("src");
    make_tree(&src, 31, 5, 10_000);
    let far = chrono::DateTime::parse_from_rfc3339("9999-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    for (time, host, pid) in [
        (far, "elsewhere", 1),
        (chrono::Utc::now(), "clinic-1", u32::MAX),
        (chrono::Utc::now(), "clinic-1", 0),
    ] {
        a.plant_lock(&custos_repo::lock::LockInfo {
            time,
            exclusive: true,
            host: host.into(),
            pid,
            command: "prune".into(),
        });
        let o = t.run(&[
            "--lock-wait",
            "0s",
            "backup",
            "files",
            src.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "a lock at {time} by pid {pid} on {host} held off the backup: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // A lock a live process holds still counts (this test's own pid, on another host,
    // dated now).
    a.plant_lock(&custos_repo::lock::LockInfo {
        time: chrono::Utc::now(),
        exclusive: true,
        host: "elsewhere".into(),
        pid: std::process::id(),
        command: "prune".into(),
    });
    let err = t.fails(&["backup", "files", src.to_str().unwrap()], 11);
    assert!(err.contains("exclusive lock is held by `prune`"), "{err}");
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 3);
}

#[test]
fn objects_far_larger_than_custos_writes_are_not_read() {
    // Every command lists and reads the key files, backups the locks, listings the
    // snapshots. A planted object of 8 GiB (sparse here; storage can serve any) was read
    // whole into memory by every one of them before it failed to parse.
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 5, 5, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let repo = std::path::Path::new(&t.repo);
    let huge = "ab".repeat(32);
    for dir in ["keys", "locks", "snapshots"] {
        let f = std::fs::File::create(repo.join(dir).join(&huge)).unwrap();
        f.set_len(8 << 30).unwrap();
    }
    let o = t.run(&["backup", "files", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for what in ["lock", "snapshot"] {
        assert!(
            err.contains(&format!("{what} `"))
                && err.contains("8589934592 bytes, more than custos ever writes"),
            "{what}: {err}"
        );
    }
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 2);
    let o = t.run(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(14));
    let v = String::from_utf8_lossy(&o.stdout);
    for what in ["key file", "snapshot"] {
        assert!(
            v.contains(&format!("{what} `")) && v.contains("8589934592 bytes"),
            "{what}: {v}"
        );
    }
    for dir in ["keys", "locks", "snapshots"] {
        std::fs::remove_file(repo.join(dir).join(&huge)).unwrap();
    }
    t.ok(&["verify"]);
}

#[test]
fn facts_a_backup_key_wrote_are_shown_not_trusted() {
    // The facts of an audit-log export are whatever the key that wrote it said. A link
    // to the export before it of fewer than 12 bytes (or with a character across byte 12)
    // made `custos snapshots` slice it there and panic, for every snapshot listed.
    let mut t = T::new();
    t.add_key("backup", "stolen host", &[]);
    let a = Attacker::open(&t, "stolen host");
    for prev in ["x", "0123456789a\u{e9}", "\u{1b}[2J"] {
        let facts = serde_json::json!({
            "database": "clinical", "table": "public.audit_log", "order_by": "id",
            "seq": 7, "xid_from": 1, "xid_to": 2, "rows": u64::MAX, "carried": 0,
            "snapshot_time": "2026-12-01T00:00:00Z", "lsn": "0/5000028",
            "content": "00", "prev": prev, "hash": "00",
        });
        a.plant_audit_export(chrono::Utc::now(), Some(facts));
    }
    let out = t.ok(&["snapshots"]);
    assert_eq!(
        out.matches("audit-log export 7 of public.audit_log")
            .count(),
        3,
        "{out}"
    );
    assert!(
        out.contains("links to x\n") && out.contains("links to 0123456789a\u{e9}"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "a control character reached the terminal: {out:?}"
    );
}

#[test]
fn objects_fetched_by_name_are_read_no_further_than_custos_writes() {
    // Trail entries, the head hint, the config, keyring links and index objects are
    // fetched by name: no listing says their size first. Anyone who can write the trail's
    // next number (every key) or storage could plant one of gigabytes there, and every
    // command read it whole. Sparse here; storage can serve any size.
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 5, 5, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let repo = std::path::Path::new(&t.repo);
    let plant = |rel: &str, size: u64| {
        let p = repo.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    };
    let trail: Vec<u64> = std::fs::read_dir(repo.join("audit"))
        .unwrap()
        .map(|e| u64::from_str_radix(&e.unwrap().file_name().to_string_lossy(), 16).unwrap())
        .collect();
    let next = trail.iter().max().unwrap() + 1;
    plant(&format!("audit/{next:016x}"), 1 << 30);
    plant("hints/trail", 8 << 30);
    plant("keyring/00000001", 8 << 30);

    // The next operation chains to the planted entry (hashed in pieces, not held whole),
    // a restore key sets the keyring link aside, the hint is only a hint.
    let o = t.run(&["backup", "files", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("keyring link `keyring/00000001` is larger than any custos writes"),
        "{err}"
    );
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 2);

    // The trail names the planted entry, and only it: the entry after it chains.
    let err = t.fails(&["audit", "verify"], 14);
    assert!(
        err.contains(&format!("first bad entry is {next}"))
            && err.contains("larger than any custos writes"),
        "{err}"
    );
    let log = t.json(&["audit", "log"]);
    let bad: Vec<(u64, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["problems"].as_array().unwrap().is_empty())
        .map(|r| (r["seq"].as_u64().unwrap(), r["problems"].to_string()))
        .collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, next, "{bad:?}");
    assert!(
        bad[0].1.contains("larger than any custos writes"),
        "{bad:?}"
    );

    // An index object of gigabytes is damage, with the remedy; not read. (On a host with
    // no copy of the index yet: this host's on-disk build already holds that object.)
    let index = std::fs::read_dir(repo.join("index"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let kept = std::fs::read(&index).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&index)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let out = t.path("out");
    let mut elsewhere = t.with_password(PW);
    elsewhere.set(
        "CUSTOS_CACHE_DIR",
        elsewhere.path("cache").to_str().unwrap(),
    );
    let err = elsewhere.fails(
        &["restore", "files", "latest", "--to", out.to_str().unwrap()],
        14,
    );
    assert!(
        err.contains("larger than any custos writes") && err.contains("custos index rebuild"),
        "{err}"
    );
    std::fs::write(&index, kept).unwrap();

    // A config of gigabytes: every command stops at once, and says why.
    let config = repo.join("config");
    let kept = std::fs::read(&config).unwrap();
    plant("config", 8 << 30);
    let err = t.fails(&["snapshots"], 14);
    assert!(
        err.contains("the config `config` is larger than any custos writes"),
        "{err}"
    );
    std::fs::write(&config, kept).unwrap();
    for p in ["hints/trail", "keyring/00000001"] {
        std::fs::remove_file(repo.join(p)).unwrap();
    }
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);

    // A pack that storage holds larger than indexed is named, and `verify --read-data`
    // reads no more of it than the index says it has.
    let pack = t.packs().remove(0);
    let size = std::fs::metadata(&pack).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let o = t.run(&["verify", "--read-data", "--json"]);
    assert_eq!(o.status.code(), Some(14));
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(
        v.contains(&format!(
            "8589934592 bytes in storage, the index says {size}"
        )) && v.contains(&format!(
            "larger in storage than indexed ({size} bytes): not read"
        )),
        "{v}"
    );
}
