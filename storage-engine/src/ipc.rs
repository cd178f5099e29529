//! Arrow IPC from outside. The decoder trusts a stream more than Kiln can: it allocates a
//! message's body as its header says before reading it (a forged length asks for terabytes
//! and aborts the process), and panics on some malformed schemas (an unknown type). So
//! every stream of bytes Kiln did not just make itself is first checked by [`check_framing`]
//! (each message's header parses, and its body lies within the bytes given) and decoded
//! under [`guarded`], which turns a panic into an error. WAL payloads (checked by CRC, but
//! decoded at start-up, where a panic would stop the server), gRPC Arrow writes and Flight
//! SQL parameters all go through both.

use std::panic::{AssertUnwindSafe, catch_unwind};

use arrow::error::ArrowError;

/// Checks that `stream`, an Arrow IPC stream, is framed within its own bytes: every
/// message's metadata is a valid flatbuffer message, and every body ends before the
/// stream does. The decoder then never sizes anything by a length the bytes cannot back.
pub fn check_framing(stream: &[u8]) -> Result<(), String> {
    let mut pos = 0usize;
    let word = |at: usize| -> Option<u32> {
        let bytes = stream.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    };
    while pos < stream.len() {
        let Some(first) = word(pos) else {
            return Err(format!(
                "the stream ends inside a message prefix at byte {pos}"
            ));
        };
        // `0xFFFFFFFF` then the length; streams of old writers have the length alone.
        let (length, start) = if first == u32::MAX {
            let Some(length) = word(pos + 4) else {
                return Err(format!(
                    "the stream ends inside a message prefix at byte {pos}"
                ));
            };
            (length, pos + 8)
        } else {
            (first, pos + 4)
        };
        if length == 0 {
            return Ok(()); // end of stream
        }
        let end = start
            .checked_add(length as usize)
            .filter(|end| *end <= stream.len())
            .ok_or_else(|| format!("message metadata at byte {pos} runs past the stream"))?;
        let message = arrow::ipc::root_as_message(&stream[start..end])
            .map_err(|e| format!("message metadata at byte {pos} is not valid: {e}"))?;
        let body = usize::try_from(message.bodyLength())
            .map_err(|_| format!("message at byte {pos} has a negative body length"))?;
        pos = end
            .checked_add(body)
            .filter(|end| *end <= stream.len())
            .ok_or_else(|| {
                format!("message at byte {pos} claims a body of {body} bytes past the stream")
            })?;
    }
    Ok(())
}

/// Runs `decode`; a panic inside becomes an [`ArrowError::IpcError`] naming `what`.
pub fn guarded<T>(
    what: &str,
    decode: impl FnOnce() -> Result<T, ArrowError>,
) -> Result<T, ArrowError> {
    match catch_unwind(AssertUnwindSafe(decode)) {
        Ok(result) => result,
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "malformed data".to_owned());
            Err(ArrowError::IpcError(format!(
                "{what} is not a valid Arrow IPC stream: {reason}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow::error::ArrowError;

    use super::guarded;

    #[test]
    fn forged_body_lengths_are_refused_before_decoding() {
        use std::sync::Arc;

        use arrow::array::{Int64Array, RecordBatch};
        use arrow::ipc::writer::StreamWriter;

        let batch =
            RecordBatch::try_from_iter([("v", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
                .unwrap();
        let mut bytes = Vec::new();
        let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema()).unwrap();
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        drop(writer);
        super::check_framing(&bytes).unwrap();
        // Cut anywhere but between two messages, the framing is refused.
        let mut boundaries = vec![0];
        let mut pos = 0;
        while pos < bytes.len() {
            let length = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if length == 0 {
                break;
            }
            let message = arrow::ipc::root_as_message(&bytes[pos + 8..pos + 8 + length]).unwrap();
            pos += 8 + length + message.bodyLength() as usize;
            boundaries.push(pos);
        }
        for cut in 1..bytes.len() {
            let ok = super::check_framing(&bytes[..cut]).is_ok();
            assert_eq!(ok, boundaries.contains(&cut), "cut at {cut}");
        }
        assert!(super::check_framing(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10, 0, 0, 0]).is_err());
        assert!(super::check_framing(&[1, 2]).is_err());
    }

    #[test]
    fn a_panic_is_an_error_and_a_result_passes_through() {
        assert_eq!(guarded("x", || Ok(3)).unwrap(), 3);
        let err = guarded::<u8>("x", || Err(ArrowError::IpcError("bad".into()))).unwrap_err();
        assert_eq!(err.to_string(), "Ipc error: bad");
        let err = guarded::<u8>("the payload", || panic!("Type NONE not supported")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Ipc error: the payload is not a valid Arrow IPC stream: Type NONE not supported"
        );
    }
}
