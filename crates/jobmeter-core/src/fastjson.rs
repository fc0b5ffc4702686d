//! A fast path for the common shape of lifecycle events.
//!
//! Workers send flat CloudEvents whose string values carry no escapes. For
//! those, this scanner collects the fields in one pass, borrowing from the
//! input. Anything else — escapes, control characters, nested values
//! outside `data`, non-string values of known fields, duplicate keys,
//! `null`s, invalid UTF-8, trailing bytes — makes it answer `None`, and the
//! caller falls back to serde_json, which stays the reference. A property
//! test checks that both paths agree on every input the fast path accepts.

use crate::wire::{RawData, RawEvent};
use std::borrow::Cow;

struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            let c = *self.b.get(self.i)?;
            match c {
                b'"' => {
                    let out = self.s.get(start..self.i)?;
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => return None,
                c if c < 0x20 => return None,
                _ => self.i += 1,
            }
        }
    }

    /// Skips a scalar value of an unknown key: a plain string, a number,
    /// `true`, `false` or `null`. Anything else → `None`.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b't' => self.lit(b"true"),
            b'f' => self.lit(b"false"),
            b'n' => self.lit(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A number per the JSON grammar:
    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let digits = |sc: &mut Self| {
            let start = sc.i;
            while sc.b.get(sc.i).is_some_and(u8::is_ascii_digit) {
                sc.i += 1;
            }
            sc.i > start
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                digits(self);
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !digits(self) {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        Some(())
    }

    fn lit(&mut self, word: &[u8]) -> Option<()> {
        self.b.get(self.i..self.i + word.len()).filter(|w| *w == word)?;
        self.i += word.len();
        Some(())
    }

    /// Iterates the members of an object, calling `f(key, scanner)`; `f`
    /// must consume the value.
    fn object(&mut self, mut f: impl FnMut(&'a str, &mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            f(key, self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

fn set<'a>(slot: &mut Option<Cow<'a, str>>, sc: &mut Scanner<'a>) -> Option<()> {
    if slot.is_some() {
        return None; // duplicate key: serde decides
    }
    *slot = Some(Cow::Borrowed(sc.string()?));
    Some(())
}

/// Scans `bytes`; `None` means "not the common shape: use serde_json".
pub(crate) fn scan(bytes: &[u8]) -> Option<RawEvent<'_>> {
    let s = std::str::from_utf8(bytes).ok()?;
    let mut sc = Scanner { s, b: bytes, i: 0 };
    let mut f = RawEvent::default();
    let mut seen_data = false;
    sc.object(|key, sc| match key {
        "specversion" => set(&mut f.specversion, sc),
        "id" => set(&mut f.id, sc),
        "source" => set(&mut f.source, sc),
        "type" => set(&mut f.ty, sc),
        "time" => set(&mut f.time, sc),
        "subject" => set(&mut f.subject, sc),
        "data" => {
            if seen_data || sc.peek()? != b'{' {
                return None;
            }
            seen_data = true;
            let mut d = RawData::default();
            sc.object(|k, sc| match k {
                "account_id" => set(&mut d.account_id, sc),
                "kind" => set(&mut d.kind, sc),
                "model" => set(&mut d.model, sc),
                "workflow_run_id" => set(&mut d.workflow_run_id, sc),
                "gpu" => set(&mut d.gpu, sc),
                "status" => set(&mut d.status, sc),
                _ => sc.skip_scalar(),
            })?;
            f.data = Some(d);
            Some(())
        }
        _ => sc.skip_scalar(),
    })?;
    sc.ws();
    (sc.i == bytes.len()).then_some(f)
}
