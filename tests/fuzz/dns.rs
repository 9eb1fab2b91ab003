//! The DNS answer reader (`control::dns`), which reads whatever a resolver (or anything that can
//! send a datagram to the proxy's port) sends. Properties: no panic on any bytes; at most one
//! address per answer record, none of them from a record of the wrong length; bytes after the
//! counted records change nothing (a message is read by its counts, never to its end).

use llmproxy::fuzzing::dns_answer;

use crate::engine::{feature, Target};

pub const TARGET: Target = Target {
    name: "dns_answer",
    dict: &[
        b"\x81\x80",
        b"\x83\x80",
        b"\x81\x82",
        b"\x00\x01\x00\x01",
        b"\x00\x1c\x00\x01",
        b"\xc0\x0c",
        b"\x04vllm\x03svc\x00",
        b"\x00\x00\x00\x1e\x00\x04\x0a\x00\x00\x01",
        b"\x00\x10",
        b"\xff\xff",
        b"\x3f",
        b"\x80",
    ],
    max_len: 4096,
    check,
};

fn check(input: &[u8]) -> u64 {
    let got = dns_answer(input);
    if let Some(Ok(ips)) = &got {
        let ancount = input
            .get(6..8)
            .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        assert!(
            ips.len() <= ancount,
            "{} addresses from {ancount} records",
            ips.len()
        );
    }
    let mut longer = input.to_vec();
    longer.extend_from_slice(b"\x00\x01\x00\x01\xc0\x0c trailing");
    if input.len() >= 12 {
        let again = dns_answer(&longer);
        if let Some(Ok(ips)) = &got {
            assert_eq!(
                again.as_ref(),
                Some(&Ok(ips.clone())),
                "trailing bytes changed the answer"
            );
        }
    }
    feature(match &got {
        None => "none".to_string(),
        Some(Ok(ips)) => format!("ok {}", ips.len().min(8)),
        Some(Err(why)) => why.clone(),
    })
}
