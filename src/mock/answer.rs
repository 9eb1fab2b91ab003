//! Writing the chosen answer under the hooks: a plain reply in the framing `x-mock-framing` asks
//! for, or an SSE stream paced by the simulated time to first token and between tokens, each
//! event in its own chunk and its own write (as a real engine flushes per token). The faults
//! that break a response mid-way (stall, reset, garbage, split events) happen here, because only
//! here is it known how many bytes have gone out.
//!
//! Framing comes from `wire` (that is, `crate::http1`); the only raw bytes written here are the
//! garbage of `hooks` and the deliberate cut of a body. One `Out` buffer serves every write of a
//! response, so a stream costs no allocation per event beyond the event itself.

use std::{future::pending, time::Duration};

use http::{Method, Version};

use super::{
    exchange::{Action, Completion, Exchange, Flow},
    hooks::{Framing, Garbage, GARBAGE_CHUNK, GARBAGE_HEAD},
    wire::{has_no_body, response_head, ConnHeader, Out, PeerGone, Reply, Writer},
};
use crate::http1::{write as h1, BodyFraming};

/// Pause between the two halves of an SSE event under `x-mock-chunk-split`.
const SPLIT_PAUSE: Duration = Duration::from_millis(2);

/// Write the answer, honouring the hooks. Never returns while stalled.
pub(super) async fn answer(action: &Action, ex: &Exchange, writer: &mut Writer) -> Flow {
    if ex.hooks.stall_head {
        return pending().await;
    }
    let mut out = Out::new(writer);
    if ex.hooks.garbage == Some(Garbage::Head) {
        out.buf.extend_from_slice(GARBAGE_HEAD);
        return match out.flush().await {
            Ok(()) => Flow::Close,
            Err(PeerGone) => Flow::Gone,
        };
    }
    let result = match action {
        Action::Reply(reply) => write_reply(reply, ex, &mut out).await,
        Action::Delayed { reply, wait } => {
            sleep(*wait).await;
            write_reply(reply, ex, &mut out).await
        }
        Action::Stream(completion) => write_stream(completion, ex, &mut out).await,
    };
    result.unwrap_or(Flow::Gone)
}

/// The connection's fate once a response has been written in full.
fn after_response(close: bool) -> Flow {
    if close {
        Flow::Close
    } else {
        Flow::KeepAlive
    }
}

async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        monoio::time::sleep(duration).await;
    }
}

/// A plain response in the framing `x-mock-framing` asks for. `x-mock-stall-after: N` /
/// `x-mock-reset-after: N` cut it after the head and N body bytes (as framed on the wire).
async fn write_reply(reply: &Reply, ex: &Exchange, out: &mut Out<'_>) -> Result<Flow, PeerGone> {
    let hooks = &ex.hooks;
    let head_only = ex.method == Method::HEAD;
    let mut close = hooks.close || !ex.keep_alive;
    let framing = match hooks.framing {
        _ if has_no_body(reply.status) => BodyFraming::Empty,
        Framing::Length => BodyFraming::Length(reply.body.len() as u64),
        // HTTP/1.0 clients cannot read chunked bodies.
        Framing::Chunked if ex.version == Version::HTTP_11 => BodyFraming::Chunked,
        Framing::Chunked | Framing::Close => BodyFraming::UntilClose,
    };
    if framing == BodyFraming::UntilClose {
        close = true;
    }
    let conn = ConnHeader::for_request(ex.version, close, hooks.keepalive_timeout);
    let cut = hooks
        .stall_after
        .or(hooks.reset_after)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    response_head(
        &mut out.buf,
        reply.status,
        reply.content_type,
        &reply.headers,
        framing,
        conn,
    );
    if framing == BodyFraming::Chunked && cut.is_none() {
        // Head and body chunks in separate writes, so the client sees real chunk boundaries.
        out.flush().await?;
    }
    let body_start = out.buf.len();
    match framing {
        _ if head_only => {}
        BodyFraming::Empty => {}
        BodyFraming::Length(_) | BodyFraming::UntilClose => out.buf.extend_from_slice(&reply.body),
        BodyFraming::Chunked => {
            h1::chunk(&mut out.buf, &reply.body);
            out.buf.extend_from_slice(h1::LAST_CHUNK);
        }
    }
    if let Some(cut) = cut {
        // The fault is a response that stops mid-body: cut the framed bytes, chunk frames and all.
        out.buf.truncate(body_start.saturating_add(cut));
        out.flush().await?;
        if hooks.stall_after.is_some() {
            return pending().await;
        }
        return Ok(Flow::Reset);
    }
    out.flush().await?;
    Ok(after_response(close))
}

/// An SSE stream: head at once, the opening events after ttft, then one event per token spaced
/// by token_delay, then the closing events. Each event is its own chunk in its own write, but
/// for a burst without delays (`Hooks::burst`): head, events and end in one write.
async fn write_stream(
    completion: &Completion,
    ex: &Exchange,
    out: &mut Out<'_>,
) -> Result<Flow, PeerGone> {
    let hooks = &ex.hooks;
    // HTTP/1.0 has no chunked encoding: delimit by closing the connection.
    let chunked = ex.version == Version::HTTP_11;
    let close = hooks.close || !ex.keep_alive || !chunked;
    let framing = if chunked {
        BodyFraming::Chunked
    } else {
        BodyFraming::UntilClose
    };
    let conn = ConnHeader::for_request(ex.version, close, hooks.keepalive_timeout);
    let headers = [("cache-control", "no-cache".to_string())];
    response_head(
        &mut out.buf,
        200,
        "text/event-stream",
        &headers,
        framing,
        conn,
    );
    let burst = hooks.burst
        && hooks.ttft.is_zero()
        && hooks.token_delay.is_zero()
        && !hooks.chunk_split
        && hooks.stall_after.is_none()
        && hooks.reset_after.is_none();
    let flush = if burst {
        Flush::AtEnd
    } else {
        Flush::Each(hooks.chunk_split)
    };
    if !burst {
        out.flush().await?;
        sleep(hooks.ttft).await;
    }
    for event in completion.opening_events() {
        send_event(out, &event, chunked, flush).await?;
    }
    for i in 0..=completion.completion_tokens {
        if hooks.reset_after == Some(i) {
            return Ok(Flow::Reset);
        }
        if hooks.stall_after == Some(i) {
            return pending().await;
        }
        if i == completion.completion_tokens {
            break;
        }
        if i > 0 && !burst {
            sleep(hooks.token_delay).await;
        }
        if i == 1 && hooks.garbage == Some(Garbage::Chunk) {
            out.buf.extend_from_slice(GARBAGE_CHUNK);
            out.flush().await?;
            return Ok(Flow::Close);
        }
        send_event(out, &completion.token_event(i), chunked, flush).await?;
    }
    for event in completion.closing_events() {
        send_event(out, &event, chunked, flush).await?;
    }
    if chunked {
        out.buf.extend_from_slice(h1::LAST_CHUNK);
    }
    if chunked || burst {
        out.flush().await?;
    }
    Ok(after_response(close))
}

/// When a stream's events are written.
#[derive(Clone, Copy)]
enum Flush {
    /// Each in its own write, or (`x-mock-chunk-split`: true) in two chunks with a pause between,
    /// which is how a proxy's SSE parser meets an event torn across reads.
    Each(bool),
    /// All in the stream's last write (a burst).
    AtEnd,
}

/// One event framed into `out`, written as `flush` says.
async fn send_event(
    out: &mut Out<'_>,
    event: &[u8],
    chunked: bool,
    flush: Flush,
) -> Result<(), PeerGone> {
    let frame = |buf: &mut Vec<u8>, data: &[u8]| {
        if chunked {
            h1::chunk(buf, data);
        } else {
            buf.extend_from_slice(data);
        }
    };
    let split = match flush {
        Flush::AtEnd => {
            frame(&mut out.buf, event);
            return Ok(());
        }
        Flush::Each(split) => split,
    };
    if split && event.len() > 1 {
        let (first, second) = event.split_at(event.len() / 2);
        frame(&mut out.buf, first);
        out.flush().await?;
        monoio::time::sleep(SPLIT_PAUSE).await;
        frame(&mut out.buf, second);
        out.flush().await
    } else {
        frame(&mut out.buf, event);
        out.flush().await
    }
}
