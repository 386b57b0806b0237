//! A short list of things made lately, for the next call that needs the same: a pass's
//! product bindings and block tables are the pass before's.

/// At most `capacity` entries, the one used last at the back; the oldest goes first.
pub(crate) struct Recent<T> {
    entries: Vec<T>,
    capacity: usize,
}

impl<T> Recent<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
        }
    }

    /// The entry `matches` picks (now the last used), or the one `make` makes, kept.
    pub(crate) fn get_or_make<E>(
        &mut self,
        matches: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<&T, E> {
        match self.entries.iter().position(matches) {
            Some(i) => {
                let entry = self.entries.remove(i);
                self.entries.push(entry);
            }
            None => {
                let entry = make()?;
                if self.entries.len() == self.capacity {
                    self.entries.remove(0);
                }
                self.entries.push(entry);
            }
        }
        Ok(self.entries.last().expect("just pushed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hit makes nothing and keeps its entry longest; a miss past the capacity lets the
    /// least recently used go.
    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut recent = Recent::new(2);
        let mut made = 0;
        let mut get = |recent: &mut Recent<u32>, v: u32| {
            *recent
                .get_or_make(
                    |&e| e == v,
                    || {
                        made += 1;
                        Ok::<_, ()>(v)
                    },
                )
                .unwrap()
        };
        assert_eq!(get(&mut recent, 1), 1);
        assert_eq!(get(&mut recent, 2), 2);
        assert_eq!(get(&mut recent, 1), 1); // a hit: 2 is now the oldest
        assert_eq!(get(&mut recent, 3), 3); // 2 goes
        assert_eq!(get(&mut recent, 1), 1);
        assert_eq!(get(&mut recent, 2), 2); // made again
        assert_eq!(made, 4);
    }
}
