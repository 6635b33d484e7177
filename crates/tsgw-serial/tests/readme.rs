//! The README's TOML is what users copy: every example must parse and validate.

use serde::Deserialize;
use tsgw_core::extract::{Extractor, PayloadFormat};
use tsgw_core::ChannelId;
use tsgw_serial::SerialPortConfig;

#[derive(Deserialize)]
struct Gateway {
    serial: Vec<SerialPortConfig>,
}

#[derive(Deserialize)]
struct ParserOnly {
    parser: PayloadFormat,
}

fn toml_blocks(markdown: &str) -> Vec<String> {
    markdown
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn readme_examples_parse_and_validate() {
    let readme = include_str!("../README.md");
    let blocks = toml_blocks(readme);
    let (mut ports, mut parsers) = (0, 0);
    for block in &blocks {
        if block.contains("[[serial]]") {
            let g: Gateway = toml::from_str(block).unwrap_or_else(|e| panic!("{block}\n{e}"));
            for port in &g.serial {
                port.validate().unwrap_or_else(|e| panic!("{block}\n{e}"));
                ports += 1;
            }
        } else {
            for line in block.lines().filter(|l| l.starts_with("parser = ")) {
                let p: ParserOnly = toml::from_str(line).unwrap_or_else(|e| panic!("{line}\n{e}"));
                Extractor::compile(&p.parser, ChannelId::new(1).unwrap())
                    .unwrap_or_else(|e| panic!("{line}\n{e}"));
                parsers += 1;
            }
        }
    }
    assert_eq!((ports, parsers), (2, 5));
}

#[test]
fn readme_arduino_example_maps_the_line() {
    let readme = include_str!("../README.md");
    let block = toml_blocks(readme)
        .into_iter()
        .find(|b| b.contains("name = \"arduino\""))
        .expect("the Arduino example");
    let g: Gateway = toml::from_str(&block).unwrap();
    let port = &g.serial[0];
    let out = Extractor::compile(&port.parser, port.channel)
        .unwrap()
        .extract(b"t=21.5,h=40\r");
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let got: Vec<String> = out
        .values
        .iter()
        .map(|v| format!("{}:{}={}", v.channel, v.target, v.value))
        .collect();
    assert_eq!(got, vec!["1234567:field1=21.5", "1234567:field2=40"]);
}
