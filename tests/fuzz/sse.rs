//! The usage tap (`usage::extract::Tap`) on response bodies: OpenAI SSE (relayed, or with the
//! injected usage chunk stripped), TGI SSE, and JSON bodies. The first input byte picks the kind,
//! the rest is the body. Properties: no panic (overflowing token counts included); what reaches
//! the client, the usage found and the events counted are the same however the body is split
//! into reads; a tap that does not strip relays the body byte for byte; a stripping tap changes
//! nothing in a stream that carries no usage.

use llmproxy::openai::tap::{Kind, Tap, Usage};

use crate::engine::{cuts, feature, pieces, rng_for, Target};

pub const TARGET: Target = Target {
    name: "sse_usage",
    dict: &[
        b"data: ",
        b"data:",
        b"\n\n",
        b"\r\n\r\n",
        b"\n",
        b": keep-alive\n\n",
        b"event: message\n",
        b"data: [DONE]\n\n",
        b"\"usage\":",
        b"\"usage\": null",
        b"{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1}",
        b"\"completion_tokens\":",
        b"\"total_tokens\":",
        b"\"prompt_tokens_details\":{\"cached_tokens\":3}",
        b"\"choices\":[]",
        b"\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]",
        b"\"finish_reason\":null",
        b"\"finish_reason\":\"length\"",
        b"\"timings\":{\"predicted_ms\":1.5}",
        b"\"details\":{\"generated_tokens\":5,\"input_length\":3}",
        b"\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}",
        b"\"timings\":{\"prompt_n\":2,\"predicted_n\":3,\"cache_n\":1}",
        b"\"delta\":{\"content\":\"a\"}",
        b"\"token\":{\"id\":1}",
        b"\"generated_tokens\":",
        b"{",
        b"}",
        b",",
        b"null",
    ],
    max_len: 32 * 1024,
    check,
};

const KINDS: [Kind; 7] = [
    Kind::OpenAiSse {
        strip: true,
        running: true,
        timings: false,
    },
    Kind::OpenAiSse {
        strip: false,
        running: true,
        timings: false,
    },
    Kind::OpenAiSse {
        strip: true,
        running: false,
        timings: false,
    },
    Kind::OpenAiSse {
        strip: false,
        running: false,
        timings: false,
    },
    Kind::TgiSse,
    Kind::OpenAiJson,
    Kind::TgiJson,
];

#[derive(Debug, PartialEq, Eq)]
struct Tapped {
    out: Vec<u8>,
    usage: Option<Usage>,
    events: u64,
}

fn run(kind: Kind, max_event: usize, parts: &[&[u8]]) -> Tapped {
    let mut tap = Tap::with_max_event(kind, max_event);
    let mut out = Vec::new();
    for part in parts {
        tap.feed(part, &mut |d: &[u8]| out.extend_from_slice(d));
    }
    tap.finish(&mut |d: &[u8]| out.extend_from_slice(d));
    Tapped {
        out,
        usage: tap.usage(),
        events: tap.events(),
    }
}

fn check(input: &[u8]) -> u64 {
    let Some((&selector, body)) = input.split_first() else {
        return 0;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    // Every other input with a small event bound, so events past it are exercised too.
    let max_event = if selector & 0x80 != 0 { 96 } else { 1 << 20 };
    let whole = run(kind, max_event, &[body]);
    let strips = matches!(kind, Kind::OpenAiSse { strip, running, .. } if strip || running);
    if !strips {
        assert!(whole.out == body, "a relaying tap changed the body");
    } else if memchr::memmem::find(body, b"usage").is_none() {
        assert!(
            whole.out == body,
            "nothing to strip, yet the stream changed"
        );
    }
    let mut rng = rng_for(input);
    for _ in 0..2 {
        let split = run(kind, max_event, &pieces(body, &cuts(body.len(), &mut rng)));
        assert_eq!(split, whole, "the tap depends on how the body was split");
    }
    feature((
        selector % 7,
        max_event,
        whole.usage.is_some(),
        whole.events.min(4),
        whole.out.len() == body.len(),
    ))
}
