//! Plain-text tables for terminal output: right-aligned numbers, left-aligned text, one
//! header rule. Every reporting command prints through this so the output looks the same.

/// A table under construction.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Which columns are left-aligned (text); the others are right-aligned (numbers).
    left: Vec<bool>,
}

impl Table {
    /// Columns whose name starts with '<' are left-aligned (the '<' is not printed).
    pub fn new(columns: &[&str]) -> Self {
        Table {
            header: columns
                .iter()
                .map(|c| c.trim_start_matches('<').to_string())
                .collect(),
            left: columns.iter().map(|c| c.starts_with('<')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let fmt_row = |row: &Vec<String>| {
            let cells: Vec<String> = (0..cols)
                .map(|i| {
                    let cell = row.get(i).map(String::as_str).unwrap_or("");
                    if self.left[i] {
                        format!("{cell:<w$}", w = width[i])
                    } else {
                        format!("{cell:>w$}", w = width[i])
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        };
        let mut out = fmt_row(&self.header);
        out.push('\n');
        out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&fmt_row(row));
            out.push('\n');
        }
        out
    }
}

/// 1234567 -> "1.23M"; keeps tables narrow while staying exact enough to compare.
pub fn si(value: f64) -> String {
    let a = value.abs();
    let (scaled, unit) = if a >= 1e12 {
        (value / 1e12, "T")
    } else if a >= 1e9 {
        (value / 1e9, "G")
    } else if a >= 1e6 {
        (value / 1e6, "M")
    } else if a >= 1e3 {
        (value / 1e3, "k")
    } else {
        return format!("{value:.0}");
    };
    format!("{scaled:.2}{unit}")
}

/// Bytes with binary units: 1536 -> "1.50 KiB".
pub fn bytes(value: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = value;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["<name", "value"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["long".into(), "12345".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "name  value");
        assert_eq!(lines[2], "a         1");
        assert_eq!(lines[3], "long  12345");
    }

    #[test]
    fn units() {
        assert_eq!(si(17.7e9), "17.70G");
        assert_eq!(si(512.0), "512");
        assert_eq!(bytes(1536.0), "1.50 KiB");
        assert_eq!(bytes(10.0), "10 B");
    }
}
