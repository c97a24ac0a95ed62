//! Which interfaces the kernel path serves: named ones, or every up,
//! non-loopback interface of this network namespace.

use std::ffi::{CStr, CString};
use std::io;

/// An interface as found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// The interface `name` does not exist in this network namespace.
#[derive(Debug)]
pub struct NoSuchInterface {
    pub name: String,
    /// The rule file that named it, when known.
    pub file: Option<String>,
}

impl std::fmt::Display for NoSuchInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(
                f,
                "interface `{}` does not exist (from `interfaces:` in {file})",
                self.name
            ),
            None => write!(
                f,
                "interface `{}` does not exist (from `interfaces:` in the rule file)",
                self.name
            ),
        }
    }
}

impl std::error::Error for NoSuchInterface {}

/// The index of interface `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `ifindex`, if it exists.
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname wants.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The interfaces named in the rule file (`Some`), or every up,
/// non-loopback one (`None`). Names are deduplicated, order kept.
pub fn resolve(names: Option<&[String]>, file: Option<&str>) -> anyhow::Result<Vec<Interface>> {
    match names {
        Some(names) => {
            let mut out: Vec<Interface> = Vec::new();
            for name in names {
                let ifindex = ifindex(name).ok_or_else(|| NoSuchInterface {
                    name: name.clone(),
                    file: file.map(str::to_owned),
                })?;
                if !out.iter().any(|i| i.ifindex == ifindex) {
                    out.push(Interface {
                        name: name.clone(),
                        ifindex,
                    });
                }
            }
            Ok(out)
        }
        None => Ok(up_non_loopback()?),
    }
}

/// Every interface that is up and not a loopback, by index.
fn up_non_loopback() -> io::Result<Vec<Interface>> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills the pointer; freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out: Vec<Interface> = Vec::new();
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let flags = ifa.ifa_flags;
        if flags & libc::IFF_UP as u32 == 0 || flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if let Some(ifindex) = ifindex(&name)
            && !out.iter().any(|i| i.ifindex == ifindex)
        {
            out.push(Interface { name, ifindex });
        }
    }
    // SAFETY: the list from getifaddrs above.
    unsafe { libc::freeifaddrs(addrs) };
    out.sort_by_key(|i| i.ifindex);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_name_and_left_out_of_every_interface() {
        let lo = ifindex("lo").expect("lo exists");
        let all = resolve(None, None).unwrap();
        assert!(all.iter().all(|i| i.name != "lo"), "{all:?}");
        let named = resolve(Some(&["lo".into(), "lo".into()]), None).unwrap();
        assert_eq!(
            named,
            vec![Interface {
                name: "lo".into(),
                ifindex: lo
            }]
        );
    }

    #[test]
    fn a_missing_interface_names_itself_and_the_file() {
        let err = resolve(Some(&["eth9nosuch".into()]), Some("/etc/forwarder.yaml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "interface `eth9nosuch` does not exist (from `interfaces:` in /etc/forwarder.yaml)"
        );
    }
}
