//! Arbitrary bytes through every reader: random access (open, verify, chunk data, page lookup,
//! inspect) and the stream reader. Any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_image::{inspect, verify_stream, Image, StreamReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = Image::from_bytes(data.to_vec()) {
        let _ = img.verify();
        let report = inspect::report(&img);
        let _ = report.to_string();
        let _ = serde_json::to_string(&report);
        for c in img.chunks() {
            let _ = img.chunk_data(c);
            let _ = img.raw_data_offset(c);
            let _ = img.find_page(c.space, c.space_id, c.vaddr_start);
        }
    }
    if let Ok(mut s) = StreamReader::new(data) {
        while let Ok(Some(_)) = s.next_record() {}
    }
    let _ = verify_stream(data);
});
