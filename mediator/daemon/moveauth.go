package daemon

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"net"
	"strconv"
	"time"

	"d2m-mediator/cluster"
)

// Node-to-node trust for shard transfers. The shard stream travels on the
// device listener, which anyone may reach; without authentication, a host
// that learned or raced a move id could push a forged shard into the
// recipient. Every transfer is therefore signed with the cluster's secret
// (cluster.Node.Secret, created in etcd by the first node): an HMAC-SHA256
// over the move's identity in a header (checked before the body is read,
// so an unauthenticated request costs nothing), and one over the identity
// and the SHA-256 of the whole body in a trailer (checked before anything
// is imported). Why an HMAC and not mutual TLS: it needs no certificate
// authority of its own; etcd, whose access control already decides who
// may place shards, is the trust root. Encryption comes from TLS, when the
// nodes' device listeners serve it (--tls-cert): transfers then go over
// https, verified against --cluster-ca-file.
const (
	moveAuthHeader  = "D2m-Move-Auth" // HMAC of the move's identity
	moveMACTrailer  = "D2m-Move-Mac"  // HMAC of the identity and the body's hash
	moveAuthContext = "d2m-mediator shard transfer v1"
)

var errMoveAuth = errors.New("shard transfer not signed with this cluster's secret")

// moveIdentity is what the signatures cover besides the body.
func moveIdentity(mi cluster.MoveInfo) []byte {
	b := []byte(moveAuthContext)
	for _, f := range []string{mi.ID, mi.Shard.String(), mi.From, mi.To, strconv.FormatInt(mi.FromEpoch, 10)} {
		b = append(b, 0)
		b = append(b, f...)
	}
	return b
}

func moveMAC(secret []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, secret)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// signMove returns the header signature of mi.
func signMove(secret []byte, mi cluster.MoveInfo) string {
	return hex.EncodeToString(moveMAC(secret, []byte("header"), moveIdentity(mi)))
}

// checkMoveHeader verifies the header signature (constant time).
func checkMoveHeader(secret []byte, mi cluster.MoveInfo, got string) error {
	b, err := hex.DecodeString(got)
	if err != nil || len(secret) == 0 || !hmac.Equal(b, moveMAC(secret, []byte("header"), moveIdentity(mi))) {
		return errMoveAuth
	}
	return nil
}

// bodyMAC is the trailer signature: the identity and the body's hash.
func bodyMAC(secret []byte, mi cluster.MoveInfo, bodyHash []byte) []byte {
	return moveMAC(secret, []byte("body"), moveIdentity(mi), bodyHash)
}

// signingReader hashes what is read through it and, at EOF, sets the
// trailer signature in trailer (net/http sends trailers once the body
// has been read to its end).
type signingReader struct {
	r       io.Reader
	h       hash.Hash
	secret  []byte
	mi      cluster.MoveInfo
	trailer map[string][]string
}

func (s *signingReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	if err == io.EOF {
		s.trailer[moveMACTrailer] = []string{hex.EncodeToString(bodyMAC(s.secret, s.mi, s.h.Sum(nil)))}
	}
	return n, err
}

// idleConn fails a read or write that makes no progress for timeout: a
// transfer to a node that went silent (a network blackhole) ends in a
// bounded time instead of at the move's deadline.
type idleConn struct {
	net.Conn
	timeout time.Duration
}

func (c idleConn) Read(p []byte) (int, error) {
	c.Conn.SetReadDeadline(time.Now().Add(c.timeout))
	return c.Conn.Read(p)
}

func (c idleConn) Write(p []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
	return c.Conn.Write(p)
}
