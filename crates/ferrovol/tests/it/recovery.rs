//! Crash consistency of the journal: the real driver aborts (SIGABRT, no
//! cleanup) at chosen points, restarts on the same pool, and the sidecars'
//! retries converge with nothing leaked.

use crate::common;

use common::req::{self, MIB};
use common::{DriverBuilder, PoolFs, TestPool};
use ferrovol_csi as csi;
use ferrovol_csi::controller_client::ControllerClient;

/// Starts a driver that crashes at `failpoint`, makes `call` crash it, and
/// restarts a healthy driver on the same state and pool.
async fn crash_then_restart<F, Fut>(
    pool: &TestPool,
    root: &std::path::Path,
    failpoint: &str,
    call: F,
) -> common::Driver
where
    F: FnOnce(ControllerClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut crashing = DriverBuilder::new(root)
        .pool(pool)
        .env("FERROVOL_FAILPOINTS", &format!("{failpoint}=abort"))
        .start();
    call(ControllerClient::new(crashing.channel().await)).await;
    let status = crashing.wait();
    assert!(!status.success(), "the driver must have crashed at {failpoint}");
    assert!(crashing.logs().contains("failpoint reached"));
    DriverBuilder::new(root).pool(pool).start()
}

fn volume_names(list: &csi::ListVolumesResponse) -> Vec<String> {
    list.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()).collect()
}

async fn create_crash_converges(failpoint: &str) {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver = crash_then_restart(&pool, root.path(), failpoint, |mut c| async move {
        let err = c.create_volume(req::create("mysql-pvc", 64 * MIB)).await.unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
    })
    .await;
    // Whether the reservation reached the disk before the crash or not,
    // nothing of the unfinished volume may remain.
    assert!(pool.files("volumes").is_empty(), "the half-made volume was removed");
    assert!(pool.files("staging").is_empty(), "no staged leftovers");

    // The provisioner retries with the same name: one volume, as asked.
    let mut c = ControllerClient::new(driver.channel().await);
    let v = c
        .create_volume(req::create("mysql-pvc", 64 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let again = c
        .create_volume(req::create("mysql-pvc", 64 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, again.volume_id);
    assert_eq!(pool.files("volumes"), vec![pool.volume_file(&v.volume_id)]);
    let list = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(volume_names(&list), vec![v.volume_id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_reservation_before_the_file_converges() {
    create_crash_converges("create-volume-after-reserve").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_file_before_the_commit_converges() {
    create_crash_converges("create-volume-before-commit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_commit_before_publish_keeps_the_volume() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let driver =
        crash_then_restart(&pool, root.path(), "create-after-commit", |mut c| async move {
            assert!(c.create_volume(req::create("committed", 16 * MIB)).await.is_err());
        })
        .await;
    assert!(driver.logs().contains("published"), "{}", driver.logs());
    let mut c = ControllerClient::new(driver.channel().await);
    let v = c
        .create_volume(req::create("committed", 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(pool.files("volumes"), vec![pool.volume_file(&v.volume_id)], "moved into place");
    assert!(pool.files("staging").is_empty());
    let get = csi::ControllerGetVolumeRequest { volume_id: v.volume_id };
    let cond = c.controller_get_volume(get).await.unwrap().into_inner().status.unwrap();
    assert!(!cond.volume_condition.unwrap().abnormal);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_delete_finishes_the_delete() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let id = {
        let healthy = DriverBuilder::new(root.path()).pool(&pool).start();
        let mut c = ControllerClient::new(healthy.channel().await);
        let v = c
            .create_volume(req::create("doomed", 8 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        v.volume_id
    };
    let vid = id.clone();
    let driver = crash_then_restart(&pool, root.path(), "delete-after-trash", |mut c| async move {
        assert!(c.delete_volume(req::delete(&vid)).await.is_err());
    })
    .await;
    assert!(driver.logs().contains("finished deletes"), "{}", driver.logs());
    assert!(!pool.volume_file(&id).exists());
    let mut c = ControllerClient::new(driver.channel().await);
    c.delete_volume(req::delete(&id)).await.expect("the retried delete succeeds");
    let list = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(list.entries.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_snapshot_converges() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let vid = {
        let healthy = DriverBuilder::new(root.path()).pool(&pool).start();
        let mut c = ControllerClient::new(healthy.channel().await);
        c.create_volume(req::create("src", 8 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    };
    let v = vid.clone();
    let driver = crash_then_restart(
        &pool,
        root.path(),
        "create-snapshot-before-commit",
        |mut c| async move {
            assert!(c.create_snapshot(req::snapshot("snap", &v)).await.is_err());
        },
    )
    .await;
    assert!(pool.files("snapshots").is_empty(), "the unfinished snapshot file was removed");
    let mut c = ControllerClient::new(driver.channel().await);
    let s = c
        .create_snapshot(req::snapshot("snap", &vid))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    assert_eq!(pool.files("snapshots"), vec![pool.snapshot_file(&s.snapshot_id)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_reported_and_never_deleted() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    // A pool with a journal holding a volume, then a stray file. (A journal
    // holding nothing beside strays is refused: tests/startup.rs.)
    {
        let mut d = DriverBuilder::new(root.path()).pool(&pool).start();
        let mut c = ControllerClient::new(d.channel().await);
        c.create_volume(req::create("ours", MIB)).await.unwrap();
        assert!(d.terminate().success());
    }
    let stray = pool.dir.join("volumes").join("someone-elses.img");
    std::fs::write(&stray, b"not ours").unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    assert!(driver.logs().contains("orphans"), "{}", driver.logs());
    assert_eq!(std::fs::read(&stray).unwrap(), b"not ours");
}

/// The provisioner's deadline expires while CreateVolume is still working:
/// the call must finish anyway (or roll back), and the retry must converge
/// on the same volume, never ALREADY_EXISTS for its own half-done work.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_that_outlives_its_deadline_still_completes() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let (mut driver, fifo) =
        common::driver_paused_at(root.path(), &pool, "create-volume-after-reserve");
    let mut c = ControllerClient::new(driver.channel().await);

    let mut first = tonic::Request::new(req::create("slow-pvc", 16 * MIB));
    first.set_timeout(std::time::Duration::from_millis(300));
    let call = tokio::spawn({
        let mut c = c.clone();
        async move { c.create_volume(first).await }
    });
    assert!(driver.wait_for_log("failpoint reached").is_some());
    let err = call.await.unwrap().unwrap_err();
    // Go sidecars see DEADLINE_EXCEEDED; tonic's client reports CANCELLED.
    assert!(
        matches!(err.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
        "{err:?}"
    );

    // The sidecar retries while the first call is still in flight.
    // (Bounded: were the first call's work cancelled, this retry would start
    // a second creation and block at the same failpoint.)
    let mut retry = tonic::Request::new(req::create("slow-pvc", 16 * MIB));
    retry.set_timeout(std::time::Duration::from_secs(10));
    let busy = c.create_volume(retry).await.unwrap_err();
    assert_eq!(busy.code(), tonic::Code::Aborted, "{busy:?}");

    std::fs::write(&fifo, b"go").unwrap();
    let done = driver
        .wait_for_log("finished after the caller stopped waiting")
        .expect("the call finished");
    assert!(done.contains(r#"code="OK""#), "{done}");
    let volume = c
        .create_volume(req::create("slow-pvc", 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(pool.files("volumes"), vec![pool.volume_file(&volume.volume_id)]);
    assert!(pool.files("staging").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_check_reports_then_repairs_and_never_touches_orphans() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let mut crashing = DriverBuilder::new(root.path())
        .pool(&pool)
        .env("FERROVOL_FAILPOINTS", "create-volume-before-commit=abort")
        .start();
    let mut c = ControllerClient::new(crashing.channel().await);
    assert!(c.create_volume(req::create("half", 8 * MIB)).await.is_err());
    assert!(!crashing.wait().success());
    let staged = pool.files("staging");
    assert_eq!(staged.len(), 1, "the crash left a staged file");

    let (clean, text) = common::pool_check(&pool, false);
    assert!(!clean, "{text}");
    assert!(text.contains("would repair") && text.contains("unclaimed staged"), "{text}");
    assert_eq!(pool.files("staging"), staged, "a check changes nothing");

    let (ok, text) = common::pool_check(&pool, true);
    assert!(ok, "{text}");
    assert!(pool.files("staging").is_empty());
    let (clean, text) = common::pool_check(&pool, false);
    assert!(clean && text.contains("is clean"), "{text}");

    // Files no record owns are reported and left alone, even by --repair.
    let stray = pool.dir.join("volumes").join("not-ours.img");
    std::fs::write(&stray, b"keep me").unwrap();
    let (ok, text) = common::pool_check(&pool, true);
    assert!(!ok && text.contains("orphans") && text.contains("need a person"), "{text}");
    assert_eq!(std::fs::read(&stray).unwrap(), b"keep me");

    // While a driver serves the pool, the check says so instead of racing it.
    std::fs::remove_file(&stray).unwrap();
    let _serving = DriverBuilder::new(root.path()).pool(&pool).start();
    let (ok, text) = common::pool_check(&pool, false);
    assert!(!ok && text.contains("locked"), "{text}");
}

/// SIGTERM with a call still running past --shutdown-timeout: the driver
/// says which call it leaves behind and really exits (it does not go on
/// with the work while saying it stopped); the next start settles the call
/// and its retry converges.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_names_what_it_leaves_and_really_exits() {
    let pool = TestPool::new(PoolFs::Ext4).await;
    let root = tempfile::tempdir().unwrap();
    let fifo = root.path().join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let mut driver = DriverBuilder::new(root.path())
        .pool(&pool)
        .args(["--shutdown-timeout", "1"])
        .env(
            "FERROVOL_FAILPOINTS",
            &format!("create-volume-after-reserve=pause:{}", fifo.display()),
        )
        .start();
    let mut c = ControllerClient::new(driver.channel().await);
    let call = tokio::spawn(async move { c.create_volume(req::create("late", 8 * MIB)).await });
    assert!(driver.wait_for_log("failpoint reached").is_some());

    driver.signal(rustix::process::Signal::TERM);
    let said = driver.wait_for_log("exiting with calls still running");
    let status = driver.wait();
    let said = said.unwrap_or_else(|| panic!("no word of the call left behind: {}", driver.logs()));
    assert!(said.contains("CreateVolume"), "{said}");
    assert!(!status.success(), "{status:?}");
    assert!(!driver.logs().contains("INFO ferrovol_core::server: stopped"), "{}", driver.logs());
    assert!(call.await.unwrap().is_err(), "the caller saw the call fail");

    let d = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(d.channel().await);
    let v = c.create_volume(req::create("late", 8 * MIB)).await.unwrap().into_inner();
    assert_eq!(v.volume.unwrap().capacity_bytes, 8 * MIB);
    drop(d);
    let (clean, text) = common::pool_check(&pool, false);
    assert!(clean, "nothing half-done is left: {text}");
}

/// An empty thin volume's create does not wait for its file's directory
/// entry to reach the disk; a crash that loses the entry leaves a record
/// whose file recovery makes again (empty, as it was). A volume with data
/// of its own (a clone) missing its file is still reported, never remade.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_empty_thin_volume_file_is_made_again_and_others_are_reported() {
    let pool = TestPool::new(PoolFs::Xfs).await;
    let root = tempfile::tempdir().unwrap();
    let mut driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let mut c = ControllerClient::new(driver.channel().await);
    let empty = c.create_volume(req::create("empty-pvc", 64 * MIB)).await.unwrap().into_inner();
    let empty = empty.volume.unwrap().volume_id;
    let clone = req::from_volume("clone-pvc", &empty, 64 * MIB);
    let clone = c.create_volume(clone).await.unwrap().into_inner().volume.unwrap().volume_id;
    driver.terminate();
    // What a power cut before the entries were flushed would leave.
    std::fs::remove_file(pool.volume_file(&empty)).unwrap();
    std::fs::remove_file(pool.volume_file(&clone)).unwrap();

    let check = std::process::Command::new(common::BIN)
        .args(["pool", "check", "--pool-dir"])
        .arg(&pool.dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(said.contains(&format!("recreated empty [\"{empty}\"]")), "{said}");
    assert!(said.contains(&format!("dangling [\"{clone}\"]")), "{said}");

    let driver = DriverBuilder::new(root.path()).pool(&pool).start();
    let meta = std::fs::metadata(pool.volume_file(&empty)).expect("made again");
    assert_eq!(meta.len(), 64 * MIB as u64);
    assert!(!pool.volume_file(&clone).exists(), "a clone is never made up");
    let mut c = ControllerClient::new(driver.channel().await);
    let got = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: clone.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().volume_condition.unwrap().abnormal, "the clone is reported");
    c.delete_volume(req::delete(&clone)).await.unwrap();
    c.delete_volume(req::delete(&empty)).await.unwrap();
}
