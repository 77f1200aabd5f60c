//! The v2 manager against a temp-dir cgroupfs ([`FakeCgroupFs`]): files and
//! values written, delegation (moving into a leaf first), EBUSY handling,
//! usage and OOM counters, killing and removal.

use super::*;
use crate::isolation::fake::FakeCgroupFs;
use crate::process::ExitStatus;

/// PIDs above the kernel's PID_MAX_LIMIT: never a real process, so nothing
/// on the machine can be signalled by these tests.
const PID: i32 = 4_194_400;
const HELPER: i32 = 4_194_401;

fn options(fs: &Arc<FakeCgroupFs>, parent: &str) -> ProbeOptions {
    ProbeOptions {
        fs: fs.clone(),
        root: fs.root(),
        proc_root: fs.proc_root(),
        parent: parent.to_string(),
        pid: PID,
    }
}

fn all() -> Arc<FakeCgroupFs> {
    Arc::new(FakeCgroupFs::v2(&["memory", "cpu", "pids", "io"]).unwrap())
}

fn limits() -> CgroupLimits {
    CgroupLimits {
        memory_max: Some(64 << 20),
        memory_high: Some(48 << 20),
        cpu: Some(0.5),
        pids_max: Some(32),
    }
}

#[test]
fn creates_instance_cgroups_with_every_limit_written() {
    let fs = all();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    // The supervisor is in the real root: nothing to move.
    assert!(tree.leaf.is_none());
    tree.setup().unwrap();
    assert_eq!(fs.file("cgroup.subtree_control").trim(), "memory cpu pids");
    assert_eq!(
        fs.file("plugvisor/cgroup.subtree_control").trim(),
        "memory cpu pids"
    );

    let cg = tree.create("echo-0-1", &limits()).unwrap();
    assert_eq!(cg.mechanism(), Mechanism::V2);
    assert_eq!(cg.paths(), vec![fs.root().join("plugvisor/echo-0-1")]);
    let at = |file: &str| fs.written(&format!("plugvisor/echo-0-1/{file}"));
    assert_eq!(at("memory.max").as_deref(), Some("67108864"));
    assert_eq!(at("memory.high").as_deref(), Some("50331648"));
    assert_eq!(at("memory.swap.max").as_deref(), Some("0"));
    assert_eq!(at("memory.oom.group").as_deref(), Some("1"));
    assert_eq!(at("cpu.max").as_deref(), Some("50000 100000"));
    assert_eq!(at("pids.max").as_deref(), Some("32"));
    let procs = cg.open_procs().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(
        procs[0].path,
        fs.root().join("plugvisor/echo-0-1/cgroup.procs")
    );

    // No limits: nothing written but the OOM grouping.
    let plain = tree.create("plain-0-1", &CgroupLimits::default()).unwrap();
    let written: Vec<_> = fs
        .writes()
        .into_iter()
        .filter(|(p, _)| p.starts_with("plugvisor/plain-0-1/"))
        .collect();
    assert_eq!(
        written,
        vec![(
            "plugvisor/plain-0-1/memory.oom.group".to_string(),
            "1".to_string()
        )]
    );
    plain.remove().unwrap();
}

#[test]
fn moves_itself_into_a_leaf_before_enabling_controllers_and_handles_ebusy() {
    let fs = all();
    let service = "/system.slice/plugvisor.service";
    // systemd started the daemon and a helper in the delegated cgroup.
    fs.add_v2_cgroup(service, &[PID, HELPER]).unwrap();
    fs.set_own_cgroup(service).unwrap();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    assert_eq!(
        tree.leaf,
        Some(fs.root().join("system.slice/plugvisor.service/supervisor"))
    );
    tree.setup().unwrap();

    let writes = fs.writes();
    let position = |path: &str| writes.iter().position(|(p, _)| p == path);
    let moved = position("system.slice/plugvisor.service/supervisor/cgroup.procs").unwrap();
    let enabled = position("system.slice/plugvisor.service/cgroup.subtree_control").unwrap();
    assert!(moved < enabled, "moved into the leaf first: {writes:#?}");
    assert_eq!(writes[moved].1, PID.to_string());
    // The first attempt at enabling answered EBUSY (the helper was still in
    // the delegated cgroup); the helper was moved and the retry succeeded.
    let leaf = fs.file("system.slice/plugvisor.service/supervisor/cgroup.procs");
    assert_eq!(leaf, format!("{PID}\n{HELPER}\n"));
    assert_eq!(fs.file("system.slice/plugvisor.service/cgroup.procs"), "");
    assert_eq!(
        fs.file("system.slice/plugvisor.service/cgroup.subtree_control")
            .trim(),
        "memory cpu pids"
    );
    assert_eq!(
        fs.file("system.slice/plugvisor.service/plugvisor/cgroup.subtree_control")
            .trim(),
        "memory cpu pids"
    );
    let cg = tree.create("kv-0-3", &limits()).unwrap();
    assert_eq!(
        cg.paths(),
        vec![
            fs.root()
                .join("system.slice/plugvisor.service/plugvisor/kv-0-3")
        ]
    );
}

#[test]
fn a_restart_in_place_finds_its_delegated_cgroup_above_the_leaf() {
    let fs = all();
    fs.add_v2_cgroup("/system.slice/plugvisor.service/supervisor", &[PID])
        .unwrap();
    fs.set_own_cgroup("/system.slice/plugvisor.service/supervisor")
        .unwrap();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    assert_eq!(tree.base, fs.root().join("system.slice/plugvisor.service"));
    // Not living in the base itself: no leaf to move into again.
    assert!(tree.leaf.is_none());
    tree.setup().unwrap();
    assert!(
        fs.root()
            .join("system.slice/plugvisor.service/plugvisor")
            .is_dir()
    );
}

#[test]
fn an_absolute_parent_is_taken_from_the_root() {
    let fs = all();
    fs.add_v2_cgroup("/user.slice/session-1.scope", &[PID])
        .unwrap();
    fs.set_own_cgroup("/user.slice/session-1.scope").unwrap();
    let tree = V2Tree::probe(&options(&fs, "/plugvisor/prod"), &fs.root()).unwrap();
    assert!(tree.leaf.is_none());
    tree.setup().unwrap();
    tree.create("echo-0-1", &limits()).unwrap();
    assert!(
        fs.root()
            .join("plugvisor/prod/echo-0-1/memory.max")
            .is_file()
    );
    // The session scope was left alone.
    assert_eq!(
        fs.file("user.slice/session-1.scope/cgroup.procs"),
        format!("{PID}\n")
    );
}

#[test]
fn ebusy_that_does_not_clear_is_an_error_with_a_hint() {
    let fs = all();
    fs.add_v2_cgroup("/system.slice/plugvisor.service", &[PID])
        .unwrap();
    fs.set_own_cgroup("/system.slice/plugvisor.service")
        .unwrap();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    fs.fail_writes("cgroup.subtree_control", libc::EBUSY, 100);
    let e = tree.setup().unwrap_err().to_string();
    assert!(e.contains("cannot write `+memory +cpu +pids` to"), "{e}");
    assert!(e.contains("cgroup.subtree_control"), "{e}");
    assert!(
        e.contains("still holds processes") && e.contains("Delegate=yes"),
        "{e}"
    );
}

#[test]
fn permission_errors_say_what_to_do() {
    let fs = all();
    fs.add_v2_cgroup("/system.slice/plugvisor.service", &[PID])
        .unwrap();
    fs.set_own_cgroup("/system.slice/plugvisor.service")
        .unwrap();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    fs.fail_writes("cgroup.procs", libc::EACCES, 1);
    let e = tree.setup().unwrap_err().to_string();
    assert!(e.starts_with(&format!("cannot write `{PID}` to ")), "{e}");
    assert!(
        e.contains("supervisor/cgroup.procs: Permission denied"),
        "{e}"
    );
    assert!(
        e.contains("Hint: run plugvisor as root, or under systemd with Delegate=yes"),
        "{e}"
    );

    fs.fail_writes("pids.max", libc::EACCES, 1);
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    tree.setup().unwrap();
    let e = tree.create("echo-0-1", &limits()).unwrap_err().to_string();
    assert!(
        e.contains("cannot write `32` to") && e.contains("echo-0-1/pids.max"),
        "{e}"
    );
    // A failed create leaves nothing behind.
    assert!(
        !fs.root()
            .join("system.slice/plugvisor.service/plugvisor/echo-0-1")
            .exists()
    );
}

#[test]
fn a_tree_without_controllers_is_unusable() {
    let fs = Arc::new(FakeCgroupFs::v2(&["io"]).unwrap());
    let e = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap_err();
    assert!(e.contains("offers none of the memory, cpu and pids"), "{e}");
}

#[test]
fn missing_controllers_are_skipped_not_written() {
    let fs = Arc::new(FakeCgroupFs::v2(&["memory", "pids"]).unwrap());
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    assert!(!tree.controllers().cpu);
    tree.setup().unwrap();
    tree.create("echo-0-1", &limits()).unwrap();
    assert!(fs.written("plugvisor/echo-0-1/cpu.max").is_none());
    assert_eq!(
        fs.written("plugvisor/echo-0-1/pids.max").as_deref(),
        Some("32")
    );
}

#[test]
fn usage_and_oom_kills_are_read_from_the_cgroup() {
    let fs = all();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    tree.setup().unwrap();
    let cg = tree.create("echo-0-1", &limits()).unwrap();
    let dir = "plugvisor/echo-0-1";
    fs.set_file(&format!("{dir}/memory.current"), "1048576\n")
        .unwrap();
    fs.set_file(&format!("{dir}/memory.peak"), "2097152\n")
        .unwrap();
    fs.set_file(
        &format!("{dir}/cpu.stat"),
        "usage_usec 1500000\nuser_usec 1000000\n",
    )
    .unwrap();
    fs.set_file(&format!("{dir}/pids.current"), "7\n").unwrap();
    fs.set_file(&format!("{dir}/pids.events"), "max 3\n")
        .unwrap();
    assert!(!cg.oom_evidence().explains(ExitStatus::Signaled {
        signal: libc::SIGKILL,
        core_dumped: false
    }));
    fs.set_file(
        &format!("{dir}/memory.events"),
        "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n",
    )
    .unwrap();
    let usage = cg.usage();
    assert_eq!(usage.memory_current, Some(1 << 20));
    assert_eq!(usage.memory_peak, Some(2 << 20));
    assert_eq!(usage.cpu, Some(Duration::from_millis(1500)));
    assert_eq!(usage.pids_current, Some(7));
    assert_eq!(usage.pids_rejected, Some(3));
    assert_eq!(usage.oom_kills, Some(1));
    assert!(cg.oom_evidence().explains(ExitStatus::Signaled {
        signal: libc::SIGKILL,
        core_dumped: false
    }));
}

#[test]
fn the_whole_cgroup_is_killed_then_removed_once_empty() {
    let fs = all();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    tree.setup().unwrap();
    let cg = tree.create("echo-0-1", &limits()).unwrap();
    let dir = "plugvisor/echo-0-1";
    fs.set_file(&format!("{dir}/cgroup.procs"), &format!("{PID}\n"))
        .unwrap();
    cg.kill_all().unwrap();
    assert_eq!(
        fs.written(&format!("{dir}/cgroup.kill")).as_deref(),
        Some("1")
    );
    assert_eq!(cg.pids().unwrap(), vec![PID]);
    let e = cg.remove().unwrap_err();
    assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
    // The kernel empties it once the processes are gone.
    fs.set_file(&format!("{dir}/cgroup.procs"), "").unwrap();
    cg.remove().unwrap();
    assert!(!fs.root().join(dir).exists());

    // Before Linux 5.14 (no cgroup.kill): freeze, kill, thaw.
    let old = tree.create("old-0-1", &limits()).unwrap();
    std::fs::remove_file(fs.root().join("plugvisor/old-0-1/cgroup.kill")).unwrap();
    old.kill_all().unwrap();
    let freezes: Vec<String> = fs
        .writes()
        .into_iter()
        .filter(|(p, _)| p == "plugvisor/old-0-1/cgroup.freeze")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(freezes, vec!["1", "0"]);
}

#[test]
fn stale_cgroups_of_an_earlier_run_are_cleaned() {
    let fs = all();
    let tree = V2Tree::probe(&options(&fs, "plugvisor"), &fs.root()).unwrap();
    tree.setup().unwrap();
    tree.create("echo-0-1", &limits()).unwrap();
    tree.create("kv-0-7", &limits()).unwrap();
    // A plugin that made its own sub-cgroup.
    fs.mkdir(&fs.root().join("plugvisor/kv-0-7/inner")).unwrap();
    let removed = tree.clean_stale().unwrap();
    assert_eq!(removed, vec!["echo-0-1", "kv-0-7"]);
    assert!(fs.subdirs(&fs.root().join("plugvisor")).unwrap().is_empty());
    tree.teardown().unwrap();
    assert!(!fs.root().join("plugvisor").exists());
}
