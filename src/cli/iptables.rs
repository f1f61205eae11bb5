//! `keycard iptables`: Istio-compatible traffic capture for the workload's network namespace, run
//! once as an init step with NET_ADMIN. Inbound TCP is REDIRECTed to the sidecar's inbound
//! capture port (15006), outbound TCP to its outbound capture port (15001); the sidecar's own
//! traffic (uid/gid 1337), loopback, and the excluded ports and CIDRs are left alone. Rules live in
//! keycard's own chains of the `nat` table, so re-running replaces them and `--cleanup` removes
//! exactly them, leaving everyone else's rules (Docker's DNS, for one) in place.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use ipnet::IpNet;

#[derive(Debug, Args)]
pub struct IptablesArgs {
    /// Port of the sidecar's `capture.inbound` listener.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Port of the sidecar's `capture.outbound` listener.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The sidecar's uid: its connections are never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The sidecar's gid: its connections are never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Inbound ports that reach the workload directly (comma-separated). The sidecar's admin,
    /// metrics and readiness ports are always excluded.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone (comma-separated, e.g. 169.254.169.254/32).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<IpNet>,
    /// Also program ip6tables (IPv6 rules mirror the IPv4 ones).
    #[arg(long)]
    ipv6: bool,
    /// Which iptables: `auto` picks the one that already holds rules here (as Istio does), else
    /// what `iptables --version` reports.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Print the rules (iptables-restore input) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Remove keycard's rules and chains instead of installing them.
    #[arg(long)]
    cleanup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Auto,
    Nft,
    Legacy,
}

/// The sidecar's own listeners, never redirected inbound.
const SIDECAR_PORTS: [u16; 3] = [15000, 15020, 15021];

const CHAINS: [&str; 4] = ["KEYCARD_INBOUND", "KEYCARD_IN_REDIRECT", "KEYCARD_OUTPUT", "KEYCARD_REDIRECT"];
/// The jumps from the built-in chains into ours.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "KEYCARD_INBOUND"), ("OUTPUT", "KEYCARD_OUTPUT")];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// The `nat` table input for `iptables-restore --noflush`: our chains (declaring a chain empties
/// it) and the rules in them. The jumps from PREROUTING/OUTPUT are added separately, once.
fn rules(a: &IptablesArgs, family: Family) -> String {
    let mut r = String::from("*nat\n");
    for c in CHAINS {
        r.push_str(&format!(":{c} - [0:0]\n"));
    }
    let inbound_excluded: BTreeSet<u16> =
        SIDECAR_PORTS.iter().chain(&a.exclude_inbound_ports).copied().collect();
    for p in inbound_excluded {
        r.push_str(&format!("-A KEYCARD_INBOUND -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str("-A KEYCARD_INBOUND -p tcp -j KEYCARD_IN_REDIRECT\n");
    r.push_str(&format!("-A KEYCARD_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", a.inbound_port));
    // Outbound: the sidecar's own connections, loopback, then the exclusions, then capture.
    r.push_str(&format!("-A KEYCARD_OUTPUT -m owner --uid-owner {} -j RETURN\n", a.proxy_uid));
    r.push_str(&format!("-A KEYCARD_OUTPUT -m owner --gid-owner {} -j RETURN\n", a.proxy_gid));
    r.push_str("-A KEYCARD_OUTPUT -o lo -j RETURN\n");
    r.push_str(&format!("-A KEYCARD_OUTPUT -d {} -j RETURN\n", family.loopback()));
    for net in &a.exclude_outbound_cidrs {
        let ours = matches!((net, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6));
        if ours {
            r.push_str(&format!("-A KEYCARD_OUTPUT -d {net} -j RETURN\n"));
        }
    }
    for p in a.exclude_outbound_ports.iter().collect::<BTreeSet<_>>() {
        r.push_str(&format!("-A KEYCARD_OUTPUT -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str("-A KEYCARD_OUTPUT -j KEYCARD_REDIRECT\n");
    r.push_str(&format!("-A KEYCARD_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", a.outbound_port));
    r.push_str("COMMIT\n");
    r
}

/// One iptables flavour for one address family: the command and its `-save` / `-restore`.
#[derive(Debug, Clone)]
struct Tool {
    cmd: String,
    save: String,
    restore: String,
}

impl Tool {
    fn named(base: &str, suffix: &str) -> Self {
        Self {
            cmd: format!("{base}{suffix}"),
            save: format!("{base}{suffix}-save"),
            restore: format!("{base}{suffix}-restore"),
        }
    }

    fn exists(&self) -> bool {
        Command::new(&self.cmd).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
    }

    /// The number of rules in every table, as this flavour sees them.
    fn rule_count(&self) -> usize {
        Command::new(&self.save)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A ")).count())
            .unwrap_or(0)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(&self.cmd).args(args).output().with_context(|| format!("cannot run {}", self.cmd))
    }

    /// Deletes our jumps and chains; absent ones are fine (that is what makes it idempotent).
    fn cleanup(&self) -> anyhow::Result<()> {
        for (from, to) in JUMPS {
            // A jump added twice by hand or by an older run: remove every copy.
            for _ in 0..16 {
                if !self.run(&["-t", "nat", "-D", from, "-p", "tcp", "-j", to])?.status.success() {
                    break;
                }
            }
        }
        for c in CHAINS {
            let _ = self.run(&["-t", "nat", "-F", c])?;
        }
        for c in CHAINS {
            let _ = self.run(&["-t", "nat", "-X", c])?;
        }
        Ok(())
    }

    fn install(&self, rules: &str) -> anyhow::Result<()> {
        let mut child = Command::new(&self.restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.restore))?;
        child.stdin.take().context("no stdin")?.write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{} refused the rules: {}", self.restore, String::from_utf8_lossy(&out.stderr).trim());
        }
        for (from, to) in JUMPS {
            let out = self.run(&["-t", "nat", "-A", from, "-p", "tcp", "-j", to])?;
            if !out.status.success() {
                bail!("{} -A {from}: {}", self.cmd, String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(())
    }
}

/// Picks the iptables flavour for `base` (`iptables` or `ip6tables`).
fn pick(base: &str, mode: Mode) -> anyhow::Result<Tool> {
    let nft = Tool::named(base, "-nft");
    let legacy = Tool::named(base, "-legacy");
    let plain = Tool::named(base, "");
    let chosen = match mode {
        Mode::Nft => Some(nft),
        Mode::Legacy => Some(legacy),
        Mode::Auto => match (nft.exists(), legacy.exists()) {
            (true, true) => {
                // The flavour that already holds rules is the one the system uses; with none
                // anywhere, the one plain `iptables` is.
                let (n, l) = (nft.rule_count(), legacy.rule_count());
                if l > n {
                    Some(legacy)
                } else if n > l {
                    Some(nft)
                } else {
                    let version =
                        plain.run(&["--version"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                    Some(if version.is_ok_and(|v| v.contains("legacy")) { legacy } else { nft })
                }
            }
            (true, false) => Some(nft),
            (false, true) => Some(legacy),
            (false, false) => plain.exists().then_some(plain),
        },
    };
    match chosen {
        Some(t) if t.exists() => Ok(t),
        Some(t) => bail!("{} is not installed", t.cmd),
        None => bail!(
            "no {base} found: install iptables (nft or legacy), or run this step in the keycard-init image"
        ),
    }
}

pub fn run(a: IptablesArgs) -> anyhow::Result<ExitCode> {
    let families: &[(Family, &str)] = if a.ipv6 {
        &[(Family::V4, "iptables"), (Family::V6, "ip6tables")]
    } else {
        &[(Family::V4, "iptables")]
    };
    if a.dry_run {
        for (family, base) in families {
            println!(
                "# {base}-restore --noflush, then: -A PREROUTING -p tcp -j KEYCARD_INBOUND; -A OUTPUT -p tcp -j KEYCARD_OUTPUT"
            );
            print!("{}", rules(&a, *family));
        }
        return Ok(ExitCode::SUCCESS);
    }
    for (family, base) in families {
        let tool = pick(base, a.mode)?;
        tool.cleanup()?;
        if a.cleanup {
            eprintln!("keycard iptables: removed keycard's rules ({})", tool.cmd);
        } else {
            tool.install(&rules(&a, *family))?;
            eprintln!(
                "keycard iptables: inbound TCP -> :{}, outbound TCP -> :{} (uid {} and loopback exempt) via {}",
                a.inbound_port, a.outbound_port, a.proxy_uid, tool.cmd
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        a: IptablesArgs,
    }

    fn args(extra: &[&str]) -> IptablesArgs {
        Wrap::parse_from(std::iter::once("x").chain(extra.iter().copied())).a
    }

    #[test]
    fn rules_capture_everything_but_the_sidecar_loopback_and_exclusions() {
        let a = args(&[
            "--exclude-inbound-ports",
            "22,15020",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,fd00::/8",
        ]);
        let r = rules(&a, Family::V4);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        for want in [
            "-A KEYCARD_INBOUND -p tcp --dport 22 -j RETURN",
            "-A KEYCARD_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A KEYCARD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A KEYCARD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A KEYCARD_OUTPUT -o lo -j RETURN",
            "-A KEYCARD_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A KEYCARD_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A KEYCARD_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A KEYCARD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{r}");
        }
        // 15020 is listed once although excluded twice; the v6 CIDR stays out of the v4 table.
        assert_eq!(r.matches("--dport 15020").count(), 1);
        assert!(!r.contains("fd00::/8"));
        // Exemptions come before the jump to REDIRECT.
        let pos = |s: &str| lines.iter().position(|l| *l == s).unwrap();
        assert!(
            pos("-A KEYCARD_OUTPUT -m owner --uid-owner 1337 -j RETURN")
                < pos("-A KEYCARD_OUTPUT -j KEYCARD_REDIRECT")
        );
        let v6 = rules(&a, Family::V6);
        assert!(v6.contains("-A KEYCARD_OUTPUT -d ::1/128 -j RETURN") && v6.contains("-d fd00::/8"));
    }
}
