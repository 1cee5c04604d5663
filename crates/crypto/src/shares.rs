//! Shamir secret sharing (the `sharks` crate, GF(256)) of the restore key material, for
//! emergency retrieval under dual authorization: any `threshold` of `count` shares rebuild
//! it, fewer reveal nothing. Shares carry no integrity of their own, so the caller checks
//! what comes back (custos seals a checksum of the material inside the split secret).

use custos_model::{Error, Result};
use sharks::{Share, Sharks};
use zeroize::Zeroizing;

/// Splits `secret` into `count` shares (each `x || y`), any `threshold` of which rebuild it.
pub fn split(secret: &[u8], threshold: u8, count: u8) -> Result<Vec<Zeroizing<Vec<u8>>>> {
    if threshold < 2 || count < threshold {
        return Err(Error::config(format!(
            "need 2 <= threshold <= shares, got threshold {threshold} of {count} shares"
        )));
    }
    let dealer = Sharks(threshold).dealer(secret);
    Ok(dealer
        .take(count as usize)
        .map(|s| Zeroizing::new(Vec::from(&s)))
        .collect())
}

/// Rebuilds a secret from shares. With fewer than the threshold, the result is wrong
/// rather than an error: the caller must check it.
pub fn combine(shares: &[Zeroizing<Vec<u8>>], threshold: u8) -> Result<Zeroizing<Vec<u8>>> {
    let parsed: Vec<Share> = shares
        .iter()
        .map(|s| {
            Share::try_from(s.as_slice())
                .map_err(|e| Error::config(format!("a share is malformed: {e}")))
        })
        .collect::<Result<_>>()?;
    // Sharks refuses fewer shares than its threshold; ask for exactly what was given so
    // a short set yields a (wrong) secret that the caller's checksum rejects uniformly.
    let t = threshold.min(parsed.len() as u8).max(1);
    Sharks(t)
        .recover(parsed.as_slice())
        .map(Zeroizing::new)
        .map_err(|e| Error::config(format!("the shares do not combine: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_shares_rebuild_and_fewer_do_not() {
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let shares = split(&secret, 3, 5).unwrap();
        assert_eq!(*combine(&shares[1..4], 3).unwrap(), secret);
        assert_eq!(
            *combine(
                &[shares[0].clone(), shares[4].clone(), shares[2].clone()],
                3
            )
            .unwrap(),
            secret
        );
        assert_ne!(*combine(&shares[..2], 3).unwrap(), secret);
        assert!(split(&secret, 1, 5).is_err());
        assert!(split(&secret, 4, 3).is_err());
    }
}
