//! A throw-away certificate authority for mutual-TLS tests (openssl(1)): a CA, and
//! certificates it issues for a host (by IP address) or a client.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA in a directory of its own.
pub struct Pki {
    pub dir: PathBuf,
    /// Its certificate (PEM): what the other side passes as --tls-ca.
    pub ca: PathBuf,
    ca_key: PathBuf,
}

/// A certificate and its key.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `openssl req` making a new P-256 key (unencrypted) into `key`, then `more`.
fn new_key_request(dir: &Path, key: &str, more: &[&str]) {
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
    ];
    args.extend_from_slice(more);
    openssl(dir, &args);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA named `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("pki dir");
        let subject = format!("/CN={name}");
        new_key_request(
            &dir,
            "ca.key",
            &[
                "-x509",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
        }
    }

    /// A certificate for `name` whose subjectAltName is `san` ("IP:10.0.0.2", "DNS:x").
    pub fn issue(&self, name: &str, san: &str) -> Issued {
        let (key, csr, cert, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .expect("extensions file");
        let subject = format!("/CN={name}");
        new_key_request(&self.dir, &key, &["-out", &csr, "-subj", &subject]);
        let (ca, ca_key) = (
            self.ca.display().to_string(),
            self.ca_key.display().to_string(),
        );
        let serial = format!("{}", std::process::id() as u64 * 1000 + name.len() as u64);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-set_serial",
                &serial,
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
        Issued {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }
}
