package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/proto/d2mpb"
)

// testCA writes a CA certificate and a server certificate it signed for
// 127.0.0.1 into dir; it returns the file names and a pool that trusts
// the CA.
func testCA(t *testing.T, dir string) (caFile, certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "d2m test cluster CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	caFile, certFile, keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for f, b := range map[string]*pem.Block{
		caFile:   {Type: "CERTIFICATE", Bytes: caDER},
		certFile: {Type: "CERTIFICATE", Bytes: der},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: kb},
	} {
		if err := os.WriteFile(f, pem.EncodeToMemory(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pool = x509.NewCertPool()
	pool.AddCert(ca)
	return caFile, certFile, keyFile, pool
}

// dialDeviceTLS dials a wss:// node trusting pool.
func dialDeviceTLS(t *testing.T, url string, pool *x509.CertPool, k d2d.Keys, dev uint64) (*d2mclient.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: k, DeviceID: dev, HTTPClient: hc,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err == nil {
		t.Cleanup(func() { c.CloseNow() })
	}
	return c, err
}

// forwardsOf reads mediator_cluster_forwards_total{outcome} from a
// process's /metrics.
func (p *process) forwardsOf(t *testing.T, outcome string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", p.admin+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	prefix := `mediator_cluster_forwards_total{outcome="` + outcome + `"} `
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			return v
		}
	}
	return "0"
}

// TestProcessTLSForwardAndMove: every node serves wss:// itself with a
// certificate of the cluster's own CA (--tls-cert, --cluster-ca-file). A
// device that connects to a node not serving its shard is forwarded over
// TLS (the owner's certificate verified against the CA), reflects to a
// device connected to the owner, and a planned move of the shard, whose
// transfer goes over https verified the same way, hands it over: the
// device reconnects through the old owner, forwarded to the new one. A
// node started without the CA (system roots) refuses to forward to a
// certificate it cannot verify: 503, and its log says why.
func TestProcessTLSForwardAndMove(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile, pool := testCA(t, dir)
	tlsFlags := []string{"--tls-cert", certFile, "--tls-key", keyFile}
	withCA := append(tlsFlags, "--cluster-ca-file", caFile)
	// A prefix of its own per pass (-count=N shares the etcd).
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	p1 := startProcess(t, "p1", prefix, filepath.Join(dir, "p1"), withCA...)
	p2 := startProcess(t, "p2", prefix, filepath.Join(dir, "p2"), withCA...)
	if !strings.HasPrefix(p1.url, "wss://") || !strings.HasPrefix(p2.url, "wss://") {
		t.Fatalf("device URLs %s, %s: want wss://", p1.url, p2.url)
	}
	waitUntil(t, 30*time.Second, "every shard served", func() bool {
		for _, s := range p1.shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if p1.ownerOf(t, k.DeviceGroupID()[0]) == "p2" {
			break
		}
	}
	shard := k.DeviceGroupID()[0]

	// Device 1 through p1 (forwarded to p2 over TLS), device 2 on p2.
	a, err := dialDeviceTLS(t, p1.url, pool, k, 1)
	if err != nil {
		t.Fatalf("through p1 to p2's shard: %v", err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	b, err := dialDeviceTLS(t, p2.url, pool, k, 2)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, b, d2m.TypeReflectionQueueDry)
	if v := p1.forwardsOf(t, "forwarded"); v != "1" {
		t.Fatalf("p1 forwarded %s connections, want 1", v)
	}
	reflectTo := func(env string) {
		t.Helper()
		id, err := a.Reflect(context.Background(), []byte(env), 0)
		if err != nil {
			t.Fatal(err)
		}
		if ack, _ := d2m.DecodeReflectAck(recvType(t, a, d2m.TypeReflectAck).Payload); ack.ID != id {
			t.Fatalf("ack %d, want %d", ack.ID, id)
		}
		r, _ := d2m.DecodeReflected(recvType(t, b, d2m.TypeReflected).Payload)
		if string(r.Envelope) != env {
			t.Fatalf("device 2 got %q, want %q", r.Envelope, env)
		}
		b.AckReflected(context.Background(), r.ID)
	}
	reflectTo("over-tls-forward")

	// A planned move of the shard to p1: the transfer is https to p1.
	var mr adminapi.MoveResult
	if code := p2.post(t, fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=p1", shard), &mr); code != 200 || mr.To != "p1" {
		t.Fatalf("move over TLS: %d %+v", code, mr)
	}
	for _, c := range []*d2mclient.Client{a, b} {
		if code := c.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
			t.Fatalf("device %d after the move: close %d, want 1001", c.DeviceID(), code)
		}
	}
	// Both reconnect on their first attempt: device 1 now directly to
	// the new owner, device 2 through p2, forwarded over TLS to p1.
	if a, err = dialDeviceTLS(t, p1.url, pool, k, 1); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	if b, err = dialDeviceTLS(t, p2.url, pool, k, 2); err != nil {
		t.Fatalf("through p2 after the move: %v", err)
	}
	recvType(t, b, d2m.TypeReflectionQueueDry)
	if v := p2.forwardsOf(t, "forwarded"); v != "1" {
		t.Fatalf("p2 forwarded %s connections, want 1", v)
	}
	reflectTo("after-the-move")

	// A node without the CA cannot verify the owner's certificate.
	p3 := startProcess(t, "p3", prefix, filepath.Join(dir, "p3"), tlsFlags...)
	waitUntil(t, 10*time.Second, "p3 sees p1 serving the shard", func() bool {
		return p3.ownerOf(t, shard) == "p1"
	})
	if _, err := dialDeviceTLS(t, p3.url, pool, k, 3); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("through a node without the cluster CA: %v, want HTTP 503", err)
	}
	if l := p3.logLines("does not verify against the cluster CA"); len(l) == 0 {
		t.Fatal("p3 did not log why it could not forward")
	}
	if s := cluster.Shard(shard); p3.ownerOf(t, shard) != "p1" {
		t.Fatalf("shard %s moved meanwhile", s)
	}
}
