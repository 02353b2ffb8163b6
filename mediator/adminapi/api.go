// Package adminapi is the mediator's admin HTTP API: health and readiness,
// /metrics, pprof and JSON endpoints under /api/v1/ behind a bearer token
// (Handler), with the wire types cmd/mediator's operator commands decode.
// It talks to the server only through the narrow Backend interface and
// holds no server state of its own.
//
//	GET    /api/v1/stats[?local=true]                     ServerStats (cluster mode: ClusterStats)
//	GET    /api/v1/groups[?local=true][&owned=true]       GroupList
//	GET    /api/v1/groups/{group}                         GroupDetail
//	GET    /api/v1/groups/{group}/slots/{device}          SlotDetail
//	DELETE /api/v1/groups/{group}/slots/{device}          drop the slot (4113) → DropResult
//	DELETE /api/v1/groups/{group}/slots/{device}/queue    purge its queue → PurgeResult
//	GET    /api/v1/groups/{group}/lock                    LockInfo
//	DELETE /api/v1/groups/{group}/lock                    force-release → LockReleaseResult
//	GET    /api/v1/backup                                 the database file (hot snapshot)
//
// {group} is the full hex group id or a unique hex prefix of it; {device}
// is decimal (the API's own form) or any form d2m.ParseDeviceID reads. Errors are {"error": "..."} with a 4xx/5xx
// status. Device ids are JSON strings (decimal) because they are random
// u64 values that JavaScript and jq would round as numbers.
//
// In cluster mode any node answers (nodes.go): a request naming a group
// is forwarded once to the node serving the group's shard ({group} then
// needs at least two hex digits, the shard), and /api/v1/groups and
// /api/v1/stats ask every live node and merge, naming the node per row;
// ?local=true answers for the asked node alone. Every answer names the
// node that gave it in the D2m-Admin-Node header.
//
// Reads combine the store (slots, tombstones, queues: also of groups no
// device has touched since the start) with the in-memory group (who is
// connected, the leader, the transaction lock).
package adminapi

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator"
	"d2m-mediator/reflection"
)

// processStart is when the process (and, in cmd/mediator, the server)
// started; uptime in ServerStats counts from here.
var processStart = time.Now()

// JSONDeviceID is a device id that travels as a decimal JSON string.
type JSONDeviceID uint64

func (d JSONDeviceID) MarshalJSON() ([]byte, error) {
	return []byte(`"` + strconv.FormatUint(uint64(d), 10) + `"`), nil
}

// UnmarshalJSON accepts the string form and, for hand-written input, a
// plain number.
func (d *JSONDeviceID) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return fmt.Errorf("device id %s: %w", b, err)
	}
	*d = JSONDeviceID(v)
	return nil
}

// GroupSummary is one row of GET /api/v1/groups.
type GroupSummary struct {
	ID          string        `json:"id"`     // 64 hex digits
	Prefix      string        `json:"prefix"` // the short form used in logs
	Slots       int           `json:"slots"`
	Connected   int           `json:"connected"`
	Queued      int           `json:"queued"` // entries over all slots' queues
	QueuedBytes int64         `json:"queued_bytes"`
	LockHolder  *JSONDeviceID `json:"lock_holder"`    // null: no transaction lock
	Loaded      bool          `json:"loaded"`         // has in-memory state
	Node        string        `json:"node,omitempty"` // cluster mode: the node that answered for it
}

// GroupList is GET /api/v1/groups, in group id order.
type GroupList struct {
	Groups []GroupSummary `json:"groups"`
	// A cluster-wide list misses the groups of the live nodes that did
	// not answer (Errors) and of the shards nobody serves right now
	// (UnservedShards, two hex digits each); the answer is 200 all the
	// same, with what the other nodes said.
	Errors         []NodeError `json:"errors,omitempty"`
	UnservedShards []string    `json:"unserved_shards,omitempty"`
}

// NodeError is a node that did not answer its part of a cluster-wide
// answer, and why.
type NodeError struct {
	Node  string `json:"node"`
	Error string `json:"error"`
}

// SlotInfo is one device slot.
type SlotInfo struct {
	DeviceID           JSONDeviceID `json:"device_id"`
	Policy             string       `json:"policy"` // volatile or persistent
	Connected          bool         `json:"connected"`
	CreatedAt          *string      `json:"created_at"`
	CreatedAtMS        *int64       `json:"created_at_ms"`
	ConnectedSince     *string      `json:"connected_since"` // RFC 3339 (UTC); null while offline
	ConnectedSinceMS   *int64       `json:"connected_since_ms"`
	LastDisconnectAt   *string      `json:"last_disconnect_at"` // null while connected or never
	LastDisconnectAtMS *int64       `json:"last_disconnect_at_ms"`
	QueueLength        int          `json:"queue_length"`
	QueueBytes         int64        `json:"queue_bytes"`
	// The oldest queued reflection (null for an empty queue).
	OldestQueuedAt         *string  `json:"oldest_queued_at"`
	OldestQueuedAtMS       *int64   `json:"oldest_queued_at_ms"`
	OldestQueuedAgeSeconds *float64 `json:"oldest_queued_age_seconds"`
	Leader                 bool     `json:"leader"`
	LockHolder             bool     `json:"lock_holder"`
	DeviceInfoBytes        int      `json:"device_info_bytes"` // encrypted, opaque
}

// TombstoneInfo is a removed slot remembered for returning devices.
type TombstoneInfo struct {
	DeviceID JSONDeviceID `json:"device_id"`
	Reason   string       `json:"reason"` // dropped or queue_limit
	At       *string      `json:"at"`
	AtMS     *int64       `json:"at_ms"`
}

// LockInfo is a group's transaction lock (GET …/lock, and inside
// GroupDetail).
type LockInfo struct {
	Held        bool          `json:"held"`
	Holder      *JSONDeviceID `json:"holder"`
	Since       *string       `json:"since"`
	SinceMS     *int64        `json:"since_ms"`
	HeldSeconds *float64      `json:"held_seconds"`
	// Ending: the holder committed or went away and its held reflections
	// are being released; TransactionEnded follows.
	Ending     bool `json:"ending"`
	ScopeBytes int  `json:"scope_bytes"` // encrypted, opaque
}

// GroupDetail is GET /api/v1/groups/{group}.
type GroupDetail struct {
	ID                    string          `json:"id"`
	Prefix                string          `json:"prefix"`
	Loaded                bool            `json:"loaded"`
	Connected             int             `json:"connected"`
	Queued                int             `json:"queued"`
	QueuedBytes           int64           `json:"queued_bytes"`
	Leader                *JSONDeviceID   `json:"leader"`
	Lock                  LockInfo        `json:"lock"`
	SharedDeviceDataBytes int             `json:"shared_device_data_bytes"`
	Slots                 []SlotInfo      `json:"slots"`      // by device id
	Tombstones            []TombstoneInfo `json:"tombstones"` // by device id
}

// SlotDetail is GET /api/v1/groups/{group}/slots/{device}.
type SlotDetail struct {
	Group  string `json:"group"`
	Prefix string `json:"prefix"`
	SlotInfo
}

// DropResult answers DELETE …/slots/{device}.
type DropResult struct {
	Group        string       `json:"group"`
	DeviceID     JSONDeviceID `json:"device_id"`
	WasConnected bool         `json:"was_connected"`
	QueueLength  int          `json:"queue_length"` // entries deleted with the slot
}

// PurgeResult answers DELETE …/slots/{device}/queue.
type PurgeResult struct {
	Group       string       `json:"group"`
	DeviceID    JSONDeviceID `json:"device_id"`
	Connected   bool         `json:"connected"`
	PurgedCount int          `json:"purged_entries"`
	PurgedBytes int64        `json:"purged_bytes"`
}

// LockReleaseResult answers DELETE …/lock.
type LockReleaseResult struct {
	Group       string       `json:"group"`
	Holder      JSONDeviceID `json:"holder"`
	HeldSeconds float64      `json:"held_seconds"`
	// Released: TransactionEnded has gone out; false if that took longer
	// than the request was willing to wait (it still happens).
	Released bool `json:"released"`
}

// ServerStats is GET /api/v1/stats on a single node (or with
// ?local=true): this process.
type ServerStats struct {
	Node          string  `json:"node,omitempty"` // cluster mode: the node it describes
	StartedAt     string  `json:"started_at"`
	UptimeSeconds float64 `json:"uptime_seconds"`
	Ready         bool    `json:"ready"`
	Connections   struct {
		Open          int `json:"open"`
		Handshake     int `json:"handshake"`
		Authenticated int `json:"authenticated"`
	} `json:"connections"`
	GroupsLoaded int    `json:"groups_loaded"`
	Goroutines   int    `json:"goroutines"`
	GoVersion    string `json:"go_version"`
	GOMAXPROCS   int    `json:"gomaxprocs"`
	Memory       struct {
		HeapAllocBytes uint64 `json:"heap_alloc_bytes"`
		HeapInuseBytes uint64 `json:"heap_inuse_bytes"`
		HeapSysBytes   uint64 `json:"heap_sys_bytes"`
		SysBytes       uint64 `json:"sys_bytes"` // everything obtained from the OS
		RSSBytes       uint64 `json:"rss_bytes"` // VmRSS; 0 where /proc is missing
		NumGC          uint32 `json:"num_gc"`
	} `json:"memory"`
	Store struct {
		Path      string `json:"path,omitempty"`
		FileBytes int64  `json:"file_bytes,omitempty"`
	} `json:"store"`
	Config struct {
		MaxDeviceSlots    int     `json:"max_device_slots"`
		MaxTransactionTTL float64 `json:"max_transaction_ttl_seconds"`
		DeliveryWindow    int     `json:"delivery_window"`
		MaxConnections    int     `json:"max_connections"`
	} `json:"config"`
}

// ClusterStats is GET /api/v1/stats in cluster mode: one row per live
// node, by node id, with its ServerStats or why it did not answer.
type ClusterStats struct {
	Nodes []NodeStats `json:"nodes"`
}

// NodeStats is one node's row of ClusterStats.
type NodeStats struct {
	Node  string       `json:"node"`
	Stats *ServerStats `json:"stats,omitempty"`
	Error string       `json:"error,omitempty"`
}

// APIError is the body of every error answer.
type APIError struct {
	Error string `json:"error"`
}

// register adds the JSON admin endpoints to the token-protected mux. In
// cluster mode a request naming a group is answered by the node that
// serves the group's shard (onOwner).
func (a *API) register(mux *routes) {
	mux.handleFunc("GET /api/v1/stats", a.apiStats)
	mux.handleFunc("GET /api/v1/groups", a.apiGroups)
	mux.handleFunc("GET /api/v1/groups/{group}", a.onOwner(a.withGroup(a.apiGroup)))
	mux.handleFunc("GET /api/v1/groups/{group}/slots/{device}", a.onOwner(a.withSlot(a.apiSlot)))
	mux.handleFunc("DELETE /api/v1/groups/{group}/slots/{device}", a.onOwner(a.withSlot(a.apiDropSlot)))
	mux.handleFunc("DELETE /api/v1/groups/{group}/slots/{device}/queue", a.onOwner(a.withSlot(a.apiPurgeQueue)))
	mux.handleFunc("GET /api/v1/groups/{group}/lock", a.onOwner(a.withGroup(a.apiLock)))
	mux.handleFunc("DELETE /api/v1/groups/{group}/lock", a.onOwner(a.withGroup(a.apiReleaseLock)))
	mux.handleFunc("GET /api/v1/backup", a.apiBackup)
	mux.handleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no admin endpoint %s %s", r.Method, r.URL.Path)
	})
}

// httpError is an error with the status it is answered with.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, format string, a ...any) *httpError {
	return &httpError{status: status, msg: fmt.Sprintf(format, a...)}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error": "encoding the answer failed"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, status int, format string, a ...any) {
	writeJSON(w, status, APIError{Error: fmt.Sprintf(format, a...)})
}

func (a *API) writeErr(w http.ResponseWriter, err error) {
	var he *httpError
	if errors.As(err, &he) {
		writeError(w, he.status, "%s", he.msg)
		return
	}
	var ce *d2m.CloseError
	if errors.As(err, &ce) && ce.Code == d2m.CloseGoingAway {
		// The group's shard is not served here (moved away, lost) or a
		// planned move held the write past the request's deadline.
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "%v", ce.Err)
		return
	}
	a.log.Error().Err(err).Msg("admin API")
	writeError(w, http.StatusInternalServerError, "%v", err)
}

func (a *API) withGroup(h func(http.ResponseWriter, *http.Request, reflection.GroupID)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := a.resolveGroup(r.PathValue("group"))
		if err != nil {
			a.writeErr(w, err)
			return
		}
		h(w, r, id)
	}
}

func (a *API) withSlot(h func(http.ResponseWriter, *http.Request, reflection.GroupID, reflection.DeviceID)) http.HandlerFunc {
	return a.withGroup(func(w http.ResponseWriter, r *http.Request, id reflection.GroupID) {
		dev, err := parsePathDeviceID(r.PathValue("device"))
		if err != nil {
			writeError(w, http.StatusBadRequest, "%v", err)
			return
		}
		h(w, r, id, dev)
	})
}

// deviceStr is a device id in its one printed form (d2m.FormatDeviceID),
// as logs, API error texts, the CLI and the device tools show it.
func deviceStr(d reflection.DeviceID) string { return d2m.FormatDeviceID(uint64(d)) }

// parsePathDeviceID reads the {device} of an API path: decimal, the API's
// own form (ids travel as decimal JSON strings, see JSONDeviceID), or any
// form a person types that d2m.ParseDeviceID reads.
func parsePathDeviceID(s string) (reflection.DeviceID, error) {
	if v, err := strconv.ParseUint(s, 10, 64); err == nil {
		return reflection.DeviceID(v), nil
	}
	v, err := d2m.ParseDeviceID(s)
	return reflection.DeviceID(v), err
}

// resolveGroup finds the group a full hex id or a unique hex prefix names.
// A group is known if the store has state for it or a device is connected
// to it.
func (a *API) resolveGroup(param string) (reflection.GroupID, error) {
	var id reflection.GroupID
	p := strings.ToLower(param)
	if p == "" || len(p) > 2*len(id) || strings.Trim(p, "0123456789abcdef") != "" {
		return id, errorf(http.StatusBadRequest, "group %q: want the hex group id or a hex prefix of it", param)
	}
	if len(p) == 2*len(id) {
		hex.Decode(id[:], []byte(p))
		st, err := a.store().Group(id)
		if err != nil {
			return id, err
		}
		if groupStateEmpty(st) && a.liveConnections(id) == 0 {
			return id, errorf(http.StatusNotFound, "unknown group %s", p)
		}
		return id, nil
	}
	var matches []reflection.GroupID
	seen := make(map[reflection.GroupID]bool)
	err := a.store().ForEachGroup(func(g reflection.GroupID, st reflection.GroupState) error {
		if !groupStateEmpty(st) && strings.HasPrefix(g.String(), p) {
			matches = append(matches, g)
			seen[g] = true
		}
		return nil
	})
	if err != nil {
		return id, err
	}
	for _, g := range a.b.LiveGroupIDs() {
		if !seen[g] && strings.HasPrefix(g.String(), p) {
			matches = append(matches, g)
		}
	}
	switch len(matches) {
	case 0:
		return id, errorf(http.StatusNotFound, "unknown group %s (no group id starts with it)", p)
	case 1:
		return matches[0], nil
	}
	slices.SortFunc(matches, func(a, b reflection.GroupID) int { return bytes.Compare(a[:], b[:]) })
	var names []string
	for _, g := range matches[:min(len(matches), 5)] {
		names = append(names, g.String()[:min(len(p)+8, 64)])
	}
	more := ""
	if len(matches) > 5 {
		more = ", …"
	}
	return id, errorf(http.StatusConflict, "group prefix %s is ambiguous: %d groups match (%s%s); give more hex digits",
		p, len(matches), strings.Join(names, ", "), more)
}

func groupStateEmpty(st reflection.GroupState) bool {
	return len(st.Slots) == 0 && len(st.Tombstones) == 0 && len(st.SharedDeviceData) == 0
}

func (a *API) liveConnections(id reflection.GroupID) int {
	return len(a.live(id, time.Now()).conns)
}

// liveGroup is a snapshot of a group's in-memory state.
type liveGroup struct {
	loaded bool
	conns  map[reflection.DeviceID]int64 // registered connections: connected since (unix ms)
	leader *JSONDeviceID
	lock   LockInfo
}

// live snapshots the in-memory state of group id; a group that is not in
// memory has no connections, leader or lock.
func (a *API) live(id reflection.GroupID, now time.Time) liveGroup {
	g := a.b.LiveGroup(id)
	l := liveGroup{loaded: g.Loaded, conns: g.Conns}
	if g.Leader != nil {
		d := JSONDeviceID(*g.Leader)
		l.leader = &d
	}
	if t := g.Lock; t != nil {
		holder := JSONDeviceID(t.Holder)
		held := now.Sub(t.Since).Seconds()
		l.lock = LockInfo{
			Held: true, Holder: &holder, Ending: t.Ending, ScopeBytes: t.ScopeBytes,
			HeldSeconds: &held,
		}
		l.lock.Since, l.lock.SinceMS = isoMillis(t.Since.UnixMilli())
	}
	return l
}

func isoMillis(ms int64) (*string, *int64) {
	if ms == 0 {
		return nil, nil
	}
	s := time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z07:00")
	return &s, &ms
}

// slotInfo describes one stored slot; withOldest reads the first queue
// entry for the age of the oldest reflection.
func (a *API) slotInfo(id reflection.GroupID, slot reflection.Slot, l liveGroup, now time.Time, withOldest bool) (SlotInfo, error) {
	dev := slot.DeviceID
	si := SlotInfo{
		DeviceID:        JSONDeviceID(dev),
		Policy:          slot.Policy.String(),
		DeviceInfoBytes: len(slot.DeviceInfo),
		Leader:          l.leader != nil && *l.leader == JSONDeviceID(dev),
		LockHolder:      l.lock.Holder != nil && *l.lock.Holder == JSONDeviceID(dev),
	}
	si.CreatedAt, si.CreatedAtMS = isoMillis(slot.CreatedAt)
	// Only a registered connection counts: a group that is not in memory
	// has none, whatever a crashed process left in the store.
	if since, ok := l.conns[dev]; ok {
		si.Connected = true
		si.ConnectedSince, si.ConnectedSinceMS = isoMillis(since)
	} else {
		si.LastDisconnectAt, si.LastDisconnectAtMS = isoMillis(slot.LastDisconnectAt)
	}
	if qs, ok := a.store().QueueStats(id, dev); ok {
		si.QueueLength, si.QueueBytes = qs.Length, qs.Bytes
	}
	if withOldest && si.QueueLength > 0 {
		entries, err := a.store().ReadQueue(id, dev, 0, 1)
		if err != nil {
			return si, err
		}
		if len(entries) > 0 {
			ts := int64(entries[0].Timestamp)
			si.OldestQueuedAt, si.OldestQueuedAtMS = isoMillis(ts)
			age := max(0, float64(now.UnixMilli()-ts)/1000)
			si.OldestQueuedAgeSeconds = &age
		}
	}
	return si, nil
}

// apiGroups lists the device groups. In cluster mode it asks every live
// node for the groups of the shards it serves and merges the answers
// (clusterGroups); ?local=true lists this node's store alone, as on a
// single node, and ?owned=true only the groups of shards this node serves.
func (a *API) apiGroups(w http.ResponseWriter, r *http.Request) {
	local, err := boolQuery(r, "local")
	if err != nil {
		a.writeErr(w, err)
		return
	}
	owned, err := boolQuery(r, "owned")
	if err != nil {
		a.writeErr(w, err)
		return
	}
	if a.cluster != nil && !local && r.Header.Get(ForwardedHeader) == "" {
		a.clusterGroups(w, r)
		return
	}
	list, err := a.groupList(owned && a.cluster != nil)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, list)
}

// groupList lists the groups of this node's store (ownedOnly: of the
// shards this node serves), each row naming this node in cluster mode.
func (a *API) groupList(ownedOnly bool) (GroupList, error) {
	now := time.Now()
	// Collect first, then look at memory: group.mu must not be taken inside
	// the walk's read transaction (a holder of group.mu may be waiting for
	// a read transaction of its own behind a writer that waits for ours).
	type stored struct {
		id    reflection.GroupID
		slots []reflection.DeviceID
		empty bool
	}
	var groups []stored
	seen := make(map[reflection.GroupID]bool)
	err := a.store().ForEachGroup(func(g reflection.GroupID, st reflection.GroupState) error {
		seen[g] = true
		sg := stored{id: g, empty: groupStateEmpty(st)}
		for _, slot := range st.Slots {
			sg.slots = append(sg.slots, slot.DeviceID)
		}
		groups = append(groups, sg)
		return nil
	})
	if err != nil {
		return GroupList{}, err
	}
	// A group whose first slot is still being stored.
	for _, g := range a.b.LiveGroupIDs() {
		if !seen[g] {
			groups = append(groups, stored{id: g})
		}
	}
	list := GroupList{Groups: []GroupSummary{}}
	node := ""
	if a.cluster != nil {
		node = a.cluster.ID()
	}
	for _, sg := range groups {
		if ownedOnly && !a.serves(sg.id) {
			continue
		}
		l := a.live(sg.id, now)
		if sg.empty && len(l.conns) == 0 {
			continue
		}
		sum := GroupSummary{
			ID: sg.id.String(), Prefix: shortID(sg.id), Slots: len(sg.slots),
			Connected: len(l.conns), LockHolder: l.lock.Holder, Loaded: l.loaded, Node: node,
		}
		for _, dev := range sg.slots {
			if qs, ok := a.store().QueueStats(sg.id, dev); ok {
				sum.Queued += qs.Length
				sum.QueuedBytes += qs.Bytes
			}
		}
		list.Groups = append(list.Groups, sum)
	}
	slices.SortFunc(list.Groups, func(a, b GroupSummary) int { return strings.Compare(a.ID, b.ID) })
	return list, nil
}

func (a *API) groupDetail(id reflection.GroupID) (GroupDetail, error) {
	now := time.Now()
	st, err := a.store().Group(id)
	if err != nil {
		return GroupDetail{}, err
	}
	l := a.live(id, now)
	d := GroupDetail{
		ID: id.String(), Prefix: shortID(id), Loaded: l.loaded, Connected: len(l.conns),
		Leader: l.leader, Lock: l.lock, SharedDeviceDataBytes: len(st.SharedDeviceData),
		Slots: []SlotInfo{}, Tombstones: []TombstoneInfo{},
	}
	for _, slot := range st.Slots {
		si, err := a.slotInfo(id, slot, l, now, true)
		if err != nil {
			return d, err
		}
		d.Queued += si.QueueLength
		d.QueuedBytes += si.QueueBytes
		d.Slots = append(d.Slots, si)
	}
	slices.SortFunc(d.Slots, func(a, b SlotInfo) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
	for _, t := range st.Tombstones {
		ti := TombstoneInfo{DeviceID: JSONDeviceID(t.DeviceID), Reason: t.Reason.String()}
		ti.At, ti.AtMS = isoMillis(t.At)
		d.Tombstones = append(d.Tombstones, ti)
	}
	slices.SortFunc(d.Tombstones, func(a, b TombstoneInfo) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
	return d, nil
}

func (a *API) apiGroup(w http.ResponseWriter, r *http.Request, id reflection.GroupID) {
	d, err := a.groupDetail(id)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// storedSlot returns the slot as stored, or a 404.
func (a *API) storedSlot(id reflection.GroupID, dev reflection.DeviceID) (reflection.Slot, error) {
	st, err := a.store().Group(id)
	if err != nil {
		return reflection.Slot{}, err
	}
	for _, slot := range st.Slots {
		if slot.DeviceID == dev {
			return slot, nil
		}
	}
	return reflection.Slot{}, errorf(http.StatusNotFound, "group %s has no slot for device %s", shortID(id), deviceStr(dev))
}

func (a *API) apiSlot(w http.ResponseWriter, r *http.Request, id reflection.GroupID, dev reflection.DeviceID) {
	slot, err := a.storedSlot(id, dev)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	now := time.Now()
	si, err := a.slotInfo(id, slot, a.live(id, now), now, true)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, SlotDetail{Group: id.String(), Prefix: shortID(id), SlotInfo: si})
}

// apiDropSlot drops a slot exactly as a device's DropDevice of another
// device does (§12): the connected device gets 4113, a lock it holds ends
// (TransactionEnded to the others), slot and queue are deleted and a
// tombstone written. It answers once the deletion is durable.
func (a *API) apiDropSlot(w http.ResponseWriter, r *http.Request, id reflection.GroupID, dev reflection.DeviceID) {
	res, err := a.adminDropSlot(r.Context(), id, dev)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// adminDropSlot is the admin's DropDevice (see apiDropSlot).
func (a *API) adminDropSlot(ctx context.Context, id reflection.GroupID, dev reflection.DeviceID) (DropResult, error) {
	res := DropResult{Group: id.String(), DeviceID: JSONDeviceID(dev)}
	var err error
	res.WasConnected, res.QueueLength, err = a.b.DropSlot(ctx, id, dev)
	if errors.Is(err, mediator.ErrNoSlot) {
		return res, errorf(http.StatusNotFound, "group %s has no slot for device %s", shortID(id), deviceStr(dev))
	}
	return res, err
}

// apiPurgeQueue empties a slot's reflection queue, keeping the slot and its
// counter. A connected device keeps the entries already in its delivery
// window (in flight or read ahead): they may still be delivered, and its
// ReflectedAck for them stays valid (the id is in flight; acking an entry
// that is gone from disk is a no-op), so the connection is not broken.
func (a *API) apiPurgeQueue(w http.ResponseWriter, r *http.Request, id reflection.GroupID, dev reflection.DeviceID) {
	qs, ok := a.store().QueueStats(id, dev)
	if !ok {
		writeError(w, http.StatusNotFound, "group %s has no slot for device %s", shortID(id), deviceStr(dev))
		return
	}
	if err := a.b.PurgeQueue(r.Context(), id, dev); err != nil {
		a.writeErr(w, fmt.Errorf("purging the queue: %w", err))
		return
	}
	_, connected := a.live(id, time.Now()).conns[dev]
	writeJSON(w, http.StatusOK, PurgeResult{
		Group: id.String(), DeviceID: JSONDeviceID(dev), Connected: connected,
		PurgedCount: qs.Length, PurgedBytes: qs.Bytes,
	})
}

func (a *API) apiLock(w http.ResponseWriter, r *http.Request, id reflection.GroupID) {
	writeJSON(w, http.StatusOK, a.live(id, time.Now()).lock)
}

// apiReleaseLock ends the group's transaction as if its holder had
// disconnected: its held reflections go into the other queues and the
// other devices get TransactionEnded. The holder stays connected and is
// not told; a CommitTransaction it sends later is a protocol error (4010),
// after which it reconnects.
func (a *API) apiReleaseLock(w http.ResponseWriter, r *http.Request, id reflection.GroupID) {
	// Wait briefly for the held reflections to be durable in the other
	// queues; the release completes regardless.
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	holder, heldFor, released, err := a.b.ReleaseLock(ctx, id)
	switch {
	case errors.Is(err, mediator.ErrNoLock):
		writeError(w, http.StatusConflict, "no transaction lock is held in group %s", shortID(id))
		return
	case errors.Is(err, mediator.ErrLockEnding):
		writeError(w, http.StatusConflict, "the transaction lock of group %s is already being released", shortID(id))
		return
	case err != nil:
		a.writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, LockReleaseResult{
		Group: id.String(), Holder: JSONDeviceID(holder), HeldSeconds: heldFor.Seconds(), Released: released,
	})
}

// apiStats answers this node's ServerStats; in cluster mode, unless
// ?local=true, every live node's (ClusterStats).
func (a *API) apiStats(w http.ResponseWriter, r *http.Request) {
	local, err := boolQuery(r, "local")
	if err != nil {
		a.writeErr(w, err)
		return
	}
	if a.cluster != nil && !local && r.Header.Get(ForwardedHeader) == "" {
		a.clusterStats(w, r)
		return
	}
	writeJSON(w, http.StatusOK, a.serverStats())
}

func (a *API) serverStats() ServerStats {
	var st ServerStats
	if a.cluster != nil {
		st.Node = a.cluster.ID()
	}
	now := time.Now()
	st.StartedAt = processStart.UTC().Format(time.RFC3339)
	st.UptimeSeconds = now.Sub(processStart).Seconds()
	st.Ready = a.b.Ready()
	st.GroupsLoaded = a.b.GroupsLoaded()
	st.Connections.Handshake, st.Connections.Authenticated = a.b.ConnectionCounts()
	st.Connections.Open = st.Connections.Handshake + st.Connections.Authenticated
	st.Goroutines = runtime.NumGoroutine()
	st.GoVersion = runtime.Version()
	st.GOMAXPROCS = runtime.GOMAXPROCS(0)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	st.Memory.HeapAllocBytes = ms.HeapAlloc
	st.Memory.HeapInuseBytes = ms.HeapInuse
	st.Memory.HeapSysBytes = ms.HeapSys
	st.Memory.SysBytes = ms.Sys
	st.Memory.NumGC = ms.NumGC
	st.Memory.RSSBytes = readRSS()
	if p, ok := a.store().(interface{ Path() string }); ok {
		st.Store.Path = p.Path()
		if fi, err := os.Stat(st.Store.Path); err == nil {
			st.Store.FileBytes = fi.Size()
		}
	}
	cfg := a.b.Config()
	st.Config.MaxDeviceSlots = cfg.MaxDeviceSlots
	st.Config.MaxTransactionTTL = cfg.MaxTransactionTTL.Seconds()
	st.Config.DeliveryWindow = cfg.DeliveryWindow
	st.Config.MaxConnections = cfg.MaxConnections
	return st
}

// readRSS returns the resident set size from /proc/self/status (Linux),
// 0 elsewhere.
func readRSS() uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest) // "12345 kB"
		if len(fields) == 0 {
			return 0
		}
		kb, err := strconv.ParseUint(fields[0], 10, 64)
		if err != nil {
			return 0
		}
		return kb * 1024
	}
	return 0
}

// backuper is implemented by stores that can stream a consistent snapshot
// of themselves (reflection.DB).
type backuper interface {
	Backup(w io.Writer) (int64, error)
}

// apiBackup streams a hot, consistent copy of the database (one read
// transaction). The byte count follows as the trailer X-Backup-Bytes so a
// client can tell a complete copy from a cut one; a failure after the
// first byte aborts the response.
func (a *API) apiBackup(w http.ResponseWriter, r *http.Request) {
	b, ok := a.store().(backuper)
	if !ok {
		writeError(w, http.StatusNotImplemented, "this store does not support hot backups")
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition",
		fmt.Sprintf(`attachment; filename="mediator-%s.db"`, time.Now().UTC().Format("20060102T150405Z")))
	w.Header().Set("Trailer", "X-Backup-Bytes")
	cw := &countingWriter{w: w}
	start := time.Now()
	n, err := b.Backup(cw)
	if err != nil {
		a.log.Error().Err(err).Int64("bytes", cw.n).Msg("admin backup failed")
		if cw.n == 0 {
			w.Header().Del("Trailer")
			w.Header().Del("Content-Disposition")
			writeError(w, http.StatusInternalServerError, "backup: %v", err)
			return
		}
		panic(http.ErrAbortHandler) // the client sees a cut stream, never a short "success"
	}
	w.Header().Set("X-Backup-Bytes", strconv.FormatInt(n, 10))
	a.log.Info().Int64("bytes", n).Dur("took", time.Since(start)).Msg("admin backup streamed")
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
