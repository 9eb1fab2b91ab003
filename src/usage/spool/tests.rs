use super::*;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmproxy-spool-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    d
}

fn lines(b: &Batch) -> Vec<String> {
    assert_eq!(b.lines().count(), b.len());
    b.lines().map(str::to_string).collect()
}

fn line(n: usize) -> String {
    format!("{{\"event_id\":\"e{n}\"}}")
}

#[test]
fn memory_spool_bounds_and_commits() {
    let mut s = Spool::memory(64);
    for n in 0..3 {
        s.append(&line(n)).unwrap();
    }
    assert!(matches!(
        s.append(&"x".repeat(100)),
        Err(SpoolError::Full(_))
    ));
    let b = s.peek(2).unwrap();
    assert_eq!(lines(&b), vec![line(0), line(1)]);
    s.commit(&b).unwrap();
    assert_eq!(lines(&s.peek(10).unwrap()), vec![line(2)]);
}

#[test]
fn disk_spool_survives_reopen_and_resends_the_inflight_batch_whole() {
    let d = dir("reopen");
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    for n in 0..5 {
        s.append(&line(n)).unwrap();
    }
    let b = s.peek(2).unwrap();
    s.commit(&b).unwrap();
    let inflight = s.peek(2).unwrap();
    assert_eq!(lines(&inflight), vec![line(2), line(3)]);
    s.begin(&inflight).unwrap();
    s.sync().unwrap();
    drop(s); // "crash" with a batch in flight
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    s.append(&line(5)).unwrap();
    // The first batch after the restart is exactly the one that was in flight.
    let again = s.peek(10).unwrap();
    assert_eq!(lines(&again), vec![line(2), line(3)]);
    s.commit(&again).unwrap();
    let rest = s.peek(10).unwrap();
    assert_eq!(lines(&rest), vec![line(4), line(5)]);
    s.commit(&rest).unwrap();
    assert!(s.is_empty());
    // Delivered segments are gone; only the one being written remains.
    let segs = fs::read_dir(&d)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("seg-")
        })
        .count();
    assert_eq!(segs, 1);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn the_cursor_is_one_fixed_record_and_an_older_cursor_file_is_read_then_overwritten() {
    let d = dir("cursor");
    fs::create_dir_all(&d).unwrap();
    // An older version's spool: a segment with three events, two delivered, and the cursor
    // it wrote through a temporary file (left behind by a crash before the rename).
    let seg = seg_path(&d, 1);
    let text: String = (0..3).map(|n| line(n) + "\n").collect();
    fs::write(&seg, &text).unwrap();
    let two = (line(0).len() + line(1).len() + 2) as u64;
    fs::write(d.join("cursor"), format!("1 {two}\n")).unwrap();
    fs::write(d.join("cursor.tmp"), "1 0\n").unwrap();
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    assert!(!d.join("cursor.tmp").exists());
    let b = s.peek(10).unwrap();
    assert_eq!(lines(&b), vec![line(2)]);
    s.begin(&b).unwrap();
    let record = fs::read(d.join("cursor")).unwrap();
    assert_eq!(record.len(), CURSOR_LEN);
    assert_eq!(record.last(), Some(&b'\n'));
    assert_eq!(
        read_cursor(&d).unwrap(),
        (
            Some(Pos {
                seq: 1,
                offset: two
            }),
            // The batch ends where the next segment (this run's) begins.
            Some(Pos { seq: 2, offset: 0 })
        )
    );
    s.commit(&b).unwrap();
    // The shorter record replaced the longer one whole: no in-flight batch is left over.
    assert_eq!(fs::read(d.join("cursor")).unwrap().len(), CURSOR_LEN);
    assert_eq!(read_cursor(&d).unwrap().1, None);
    drop(s);
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    assert!(s.is_empty());
    assert!(lines(&s.peek(10).unwrap()).is_empty());
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_line_of_an_earlier_run_is_skipped_and_this_runs_lines_go_out_as_written() {
    let d = dir("damaged");
    fs::create_dir_all(&d).unwrap();
    fs::write(
        seg_path(&d, 1),
        format!("{}\n{{\"event_id\":\x01garbage\n{}\n", line(0), line(1)),
    )
    .unwrap();
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    let block = format!("{}\n{}\n", line(2), line(3));
    let (added, refused) = s.append_all(std::iter::once((block.as_str(), 2)));
    assert_eq!((added, refused.len()), (2, 0));
    let b = s.peek(10).unwrap();
    assert_eq!(lines(&b), vec![line(0), line(1), line(2), line(3)]);
    let _ = fs::remove_dir_all(&d);
}

/// Bytes that are not UTF-8 in an earlier run's segment are one more unreadable line: skipped,
/// and the lines after them delivered (they used to fail every read of the batch, for good).
#[test]
fn a_line_that_is_not_utf8_is_skipped_and_delivery_goes_on() {
    let d = dir("not-utf8");
    fs::create_dir_all(&d).unwrap();
    let mut old = format!("{}\n", line(0)).into_bytes();
    old.extend_from_slice(b"{\"event_id\":\"\xff\xfe\"}\n");
    old.extend_from_slice(format!("{}\n", line(1)).as_bytes());
    fs::write(seg_path(&d, 1), old).unwrap();
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    s.append(&line(2)).unwrap();
    let b = s.peek(10).unwrap();
    assert_eq!(lines(&b), vec![line(0), line(1), line(2)]);
    s.commit(&b).unwrap();
    assert!(lines(&s.peek(10).unwrap()).is_empty());
    let _ = fs::remove_dir_all(&d);
}

/// Lines longer than the read buffer, and batches that end inside it, come back whole and in
/// order across reads.
#[test]
fn lines_longer_than_the_read_buffer_come_back_whole() {
    let d = dir("long");
    let mut s = Spool::open_disk(&d, 1 << 24, Duration::from_secs(1)).unwrap();
    let long = |n: usize| {
        format!(
            "{{\"event_id\":\"e{n}\",\"pad\":\"{}\"}}",
            "x".repeat(READ_BUF + n)
        )
    };
    let all: Vec<String> = (0..5).map(long).chain((5..300).map(line)).collect();
    for l in &all {
        s.append(l).unwrap();
    }
    let mut got = Vec::new();
    loop {
        let b = s.peek(7).unwrap();
        if lines(&b).is_empty() {
            break;
        }
        got.extend(lines(&b));
        s.commit(&b).unwrap();
    }
    assert_eq!(got, all);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn append_all_keeps_what_fits_and_names_what_it_refused() {
    let d = dir("refused");
    let one = line(0).len() as u64 + 1;
    let mut s = Spool::open_disk(&d, 2 * one, Duration::from_secs(1)).unwrap();
    // Too large as a block: line by line, the first two fit.
    let block = format!("{}\n{}\n{}\n", line(0), line(1), line(2));
    let (added, refused) = s.append_all(std::iter::once((block.as_str(), 3)));
    assert_eq!(added, 2);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, line(2));
    assert!(matches!(refused[0].1, SpoolError::Full(_)));
    assert_eq!(s.pending_bytes(), 2 * one);
    assert_eq!(lines(&s.peek(10).unwrap()), vec![line(0), line(1)]);
    let _ = fs::remove_dir_all(&d);
}

#[test]
fn disk_spool_skips_torn_lines_and_respects_its_bound() {
    let d = dir("torn");
    let mut s = Spool::open_disk(&d, 200, Duration::from_secs(1)).unwrap();
    s.append(&line(0)).unwrap();
    s.sync().unwrap();
    drop(s);
    // Simulate a crash mid-write in that segment.
    let seg = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("seg-"))
        .unwrap();
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"{\"event_id\":\"tor").unwrap();
    drop(f);
    let mut s = Spool::open_disk(&d, 200, Duration::from_secs(1)).unwrap();
    s.append(&line(1)).unwrap();
    let b = s.peek(10).unwrap();
    assert_eq!(lines(&b), vec![line(0), line(1)]);
    s.commit(&b).unwrap();
    for n in 0..20 {
        if s.append(&line(n)).is_err() {
            assert!(n > 3, "bound reached too early");
            let _ = fs::remove_dir_all(&d);
            return;
        }
    }
    panic!("spool_max_bytes was not enforced");
}

#[test]
fn a_failed_write_hands_every_buffered_line_back_as_lost_and_the_spool_stays_consistent() {
    let d = dir("lost");
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    s.append(&line(0)).unwrap();
    let before = s.pending_bytes();
    // The segment's writer replaced by a read-only handle: the next write fails (EBADF).
    let Spool::Disk(disk) = &mut s else {
        panic!("not a disk spool");
    };
    let seg = seg_path(&d, disk.writer_seq());
    disk.writer = File::open(&seg).unwrap();
    let block = format!("{}\n{}\n", line(1), line(2));
    let (added, refused) = s.append_all(std::iter::once((block.as_str(), 2)));
    assert_eq!(added, 0);
    let lost: Vec<&str> = refused.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(lost, vec![line(1), line(2)]);
    assert!(refused
        .iter()
        .all(|(_, e)| matches!(e, SpoolError::Lost(_))));
    // Nothing half-counted: the bound and the next batch see only what was written.
    assert_eq!(s.pending_bytes(), before);
    assert_eq!(lines(&s.peek(10).unwrap()), vec![line(0)]);
    let _ = fs::remove_dir_all(&d);
}

/// The segment being read stays open between batches, sees what is appended to it later, and is
/// closed before it is deleted (an open descriptor would keep its blocks).
#[test]
fn the_open_segment_follows_appends_and_rotation() {
    let d = dir("reader");
    let mut s = Spool::open_disk(&d, 1 << 20, Duration::from_secs(1)).unwrap();
    for n in 0..3 {
        s.append(&line(n)).unwrap();
    }
    let b = s.peek(2).unwrap();
    assert_eq!(lines(&b), vec![line(0), line(1)]);
    s.commit(&b).unwrap();
    s.append(&line(3)).unwrap();
    let b = s.peek(10).unwrap();
    assert_eq!(
        lines(&b),
        vec![line(2), line(3)],
        "read through the kept descriptor"
    );
    let Spool::Disk(disk) = &mut s else {
        panic!("a disk spool")
    };
    let first = disk.writer_seq();
    assert_eq!(disk.reader.as_ref().map(|r| r.0), Some(first));
    disk.rotate().unwrap();
    s.append(&line(4)).unwrap();
    // The batch read before the rotation is committed; the next spans into the new segment.
    s.commit(&b).unwrap();
    let b = s.peek(10).unwrap();
    assert_eq!(lines(&b), vec![line(4)]);
    s.commit(&b).unwrap();
    let Spool::Disk(disk) = &s else {
        panic!("a disk spool")
    };
    assert!(
        !seg_path(&d, first).exists(),
        "the delivered segment is deleted"
    );
    assert_ne!(disk.reader.as_ref().map(|r| r.0), Some(first));
    assert!(s.peek(10).unwrap().is_empty());
    let _ = fs::remove_dir_all(&d);
}
