//! Turns LQL source text into positioned tokens.
//!
//! The lexer knows no statements. It recognises words (`[A-Za-z_][A-Za-z0-9_]*`, keywords and
//! field names alike; the parser decides which), quoted strings, unsigned numbers and
//! punctuation, and skips whitespace and `--` comments. Numbers are unsigned because `-` also
//! separates the ends of a layer range (`LAYERS 3-7`); the parser applies a sign where a literal
//! allows one.
//!
//! Lexing stops at the first malformed token, which becomes the end of the stream (a
//! [`Kind::Bad`] token) rather than an immediate error: the parser reports it only when it gets
//! there, so a grammatical error earlier in the script is reported first.

use crate::error::ParseError;

/// A 1-based line and column, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn error(self, message: impl Into<String>, hint: Option<String>) -> ParseError {
        ParseError {
            line: self.line,
            column: self.column,
            message: message.into(),
            hint,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// An identifier or keyword, as written.
    Word(String),
    /// A string literal's unescaped contents.
    Str(String),
    /// Digits with an optional `.digits` fraction, as written, so that integer contexts can
    /// check and convert the exact text.
    Number(String),
    Sym(Sym),
    /// The end of the script.
    End,
    /// A malformed token; the stream ends here.
    Bad(ParseError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sym {
    Semicolon,
    Comma,
    LParen,
    RParen,
    Star,
    Minus,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Sym {
    pub fn text(self) -> &'static str {
        match self {
            Sym::Semicolon => ";",
            Sym::Comma => ",",
            Sym::LParen => "(",
            Sym::RParen => ")",
            Sym::Star => "*",
            Sym::Minus => "-",
            Sym::Eq => "=",
            Sym::Ne => "!=",
            Sym::Lt => "<",
            Sym::Le => "<=",
            Sym::Gt => ">",
            Sym::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: Kind,
    pub pos: Pos,
}

/// Splits `src` into tokens, returned apart from the token that ends the stream: [`Kind::End`]
/// or [`Kind::Bad`], which appear nowhere else.
pub(crate) fn tokenize(src: &str) -> (Vec<Token>, Token) {
    let mut cursor = Cursor {
        rest: src.chars(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut tokens = Vec::new();
    loop {
        cursor.skip_blanks();
        let pos = cursor.pos;
        match cursor.token() {
            Ok(Some(kind)) => tokens.push(Token { kind, pos }),
            Ok(None) => {
                return (
                    tokens,
                    Token {
                        kind: Kind::End,
                        pos,
                    },
                )
            }
            Err(error) => {
                return (
                    tokens,
                    Token {
                        kind: Kind::Bad(error),
                        pos,
                    },
                )
            }
        }
    }
}

/// The unread rest of the source and the position of its first character.
struct Cursor<'a> {
    rest: std::str::Chars<'a>,
    pos: Pos,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.rest.clone().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest.clone().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.rest.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    /// Consumes the next character if it is `expected`.
    fn eat(&mut self, expected: char) -> bool {
        let found = self.peek() == Some(expected);
        if found {
            self.bump();
        }
        found
    }

    /// Consumes characters while `pred` holds, appending them to `out`.
    fn take_while(&mut self, out: &mut String, pred: impl Fn(char) -> bool) {
        while let Some(c) = self.peek().filter(|&c| pred(c)) {
            out.push(c);
            self.bump();
        }
    }

    /// Skips whitespace and `--` comments.
    fn skip_blanks(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('-') if self.peek_second() == Some('-') => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads one token starting at a non-blank character; `None` at the end of input.
    fn token(&mut self) -> Result<Option<Kind>, ParseError> {
        let start = self.pos;
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        let kind = if is_word_start(c) {
            let mut word = String::new();
            self.take_while(&mut word, is_word_char);
            Kind::Word(word)
        } else if c.is_ascii_digit() {
            self.number(start)?
        } else {
            // Strings and symbols both start with a character consumed whole.
            self.bump();
            if c == '"' || c == '\'' {
                self.string(c, start)?
            } else {
                Kind::Sym(self.symbol(c, start)?)
            }
        };
        Ok(Some(kind))
    }

    fn number(&mut self, start: Pos) -> Result<Kind, ParseError> {
        let mut text = String::new();
        self.take_while(&mut text, |c| c.is_ascii_digit());
        if self.eat('.') {
            text.push('.');
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                let shown = shorten(&text);
                return Err(start.error(
                    format!("malformed number {shown}: expected digits after the decimal point"),
                    Some(format!("write {shown}0 or {}", shown.trim_end_matches('.'))),
                ));
            }
            self.take_while(&mut text, |c| c.is_ascii_digit());
        }
        if self.peek().is_some_and(is_word_char) {
            self.take_while(&mut text, is_word_char);
            return Err(start.error(
                format!("malformed number {}", shorten(&text)),
                Some(
                    "names start with a letter or _; put a space between a number and a word"
                        .to_owned(),
                ),
            ));
        }
        Ok(Kind::Number(text))
    }

    /// Reads the rest of a string opened by `quote` at `start`. Either quote character may be
    /// escaped in either kind of string.
    fn string(&mut self, quote: char, start: Pos) -> Result<Kind, ParseError> {
        let mut contents = String::new();
        loop {
            let escape_pos = self.pos;
            match self.bump() {
                None => {
                    return Err(start.error(
                        "unterminated string",
                        Some(format!("close the string with a matching {quote}")),
                    ))
                }
                Some(c) if c == quote => return Ok(Kind::Str(contents)),
                Some('\\') => match self.bump() {
                    Some(c @ ('"' | '\'' | '\\')) => contents.push(c),
                    Some('n') => contents.push('\n'),
                    Some('t') => contents.push('\t'),
                    Some(other) => {
                        return Err(escape_pos.error(
                            format!("unknown escape sequence \\{other} in a string"),
                            Some(
                                r#"the escapes are \" \' \\ \n \t; write \\ for a backslash"#
                                    .to_owned(),
                            ),
                        ))
                    }
                    None => {
                        return Err(
                            start.error("unterminated string (it ends in a lone backslash)", None)
                        )
                    }
                },
                Some(c) => contents.push(c),
            }
        }
    }

    /// Reads the rest of a symbol whose first character `c` was just consumed.
    fn symbol(&mut self, c: char, start: Pos) -> Result<Sym, ParseError> {
        let sym = match c {
            ';' => Sym::Semicolon,
            ',' => Sym::Comma,
            '(' => Sym::LParen,
            ')' => Sym::RParen,
            '*' => Sym::Star,
            '-' => Sym::Minus,
            '=' => Sym::Eq,
            '<' if self.eat('=') => Sym::Le,
            '<' if self.eat('>') => Sym::Ne,
            '<' => Sym::Lt,
            '>' if self.eat('=') => Sym::Ge,
            '>' => Sym::Gt,
            '!' if self.eat('=') => Sym::Ne,
            _ => {
                return Err(start.error(
                    format!("unexpected character {c:?}"),
                    unexpected_char_hint(c, self.peek()),
                ))
            }
        };
        Ok(sym)
    }
}

/// `text`, cut to a length that keeps messages on one line.
pub(crate) fn shorten(text: &str) -> String {
    const MAX_CHARS: usize = 32;
    if text.chars().count() <= MAX_CHARS {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(MAX_CHARS - 1).collect();
        short.push('…');
        short
    }
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Suggests what was probably meant by a character LQL does not use.
fn unexpected_char_hint(c: char, next: Option<char>) -> Option<String> {
    let hint = match c {
        '!' => "write != for not-equal, or NOT to negate a condition",
        '&' => "write AND to combine conditions",
        '|' => "write OR to combine conditions",
        '.' if next.is_some_and(|n| n.is_ascii_digit()) => "write a leading zero, e.g. 0.5",
        '`' => "quote strings with \" or '",
        c if c.is_alphabetic() => "names use ASCII letters, digits and _; put other text in quotes",
        _ => return None,
    };
    Some(hint.to_owned())
}
