package main

// Human-readable output of the admin commands: aligned tables and
// key/value blocks. Scripts use --json instead.

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
)

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

func printGroups(w io.Writer, list adminapi.GroupList) {
	defer printMissing(w, list)
	if len(list.Groups) == 0 {
		fmt.Fprintln(w, "no device groups")
		return
	}
	// Cluster mode: each row names the node that answered for it.
	withNode := false
	for _, g := range list.Groups {
		withNode = withNode || g.Node != ""
	}
	tw := newTable(w)
	head := "PREFIX\tSLOTS\tCONNECTED\tQUEUED\tBYTES\tLOCK\tGROUP"
	if withNode {
		head = "PREFIX\tNODE\tSLOTS\tCONNECTED\tQUEUED\tBYTES\tLOCK\tGROUP"
	}
	fmt.Fprintln(tw, head)
	for _, g := range list.Groups {
		node := ""
		if withNode {
			node = g.Node + "\t"
		}
		fmt.Fprintf(tw, "%s\t%s%d\t%d\t%d\t%s\t%s\t%s\n",
			g.Prefix, node, g.Slots, g.Connected, g.Queued, fmtBytes(g.QueuedBytes), fmtDevice(g.LockHolder), g.ID)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d group(s)\n", len(list.Groups))
}

// printMissing says which shards' groups a cluster-wide list could not
// include.
func printMissing(w io.Writer, list adminapi.GroupList) {
	if n := len(list.UnservedShards); n > 0 {
		fmt.Fprintf(w, "not listed: the groups of %d shard(s) nobody serves right now (%s); see mediator cluster shards\n",
			n, abbreviate(list.UnservedShards, 16))
	}
	// The nodes that did not answer are the command's error.
}

// abbreviate joins the first max items and says how many more there are.
func abbreviate(items []string, max int) string {
	if len(items) <= max {
		return strings.Join(items, " ")
	}
	return fmt.Sprintf("%s … and %d more", strings.Join(items[:max], " "), len(items)-max)
}

func printGroup(w io.Writer, g adminapi.GroupDetail, now time.Time) {
	kv := newTable(w)
	fmt.Fprintf(kv, "group\t%s\n", g.ID)
	fmt.Fprintf(kv, "slots\t%d (%d connected)\n", len(g.Slots), g.Connected)
	fmt.Fprintf(kv, "queued\t%d reflection(s), %s\n", g.Queued, fmtBytes(g.QueuedBytes))
	fmt.Fprintf(kv, "leader\t%s\n", fmtDevice(g.Leader))
	fmt.Fprintf(kv, "lock\t%s\n", describeLock(g.Lock))
	kv.Flush()
	if len(g.Slots) > 0 {
		fmt.Fprintln(w)
		tw := newTable(w)
		fmt.Fprintln(tw, "DEVICE\tPOLICY\tSTATE\tSINCE\tQUEUED\tBYTES\tOLDEST\tROLE")
		for _, s := range g.Slots {
			state, since := "offline", s.LastDisconnectAtMS
			if s.Connected {
				state, since = "online", s.ConnectedSinceMS
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n",
				fmtID(s.DeviceID), s.Policy, state, fmtAgo(since, now), s.QueueLength, fmtBytes(s.QueueBytes),
				fmtAge(s.OldestQueuedAgeSeconds), roles(s))
		}
		tw.Flush()
	}
	if len(g.Tombstones) > 0 {
		fmt.Fprintln(w)
		tw := newTable(w)
		fmt.Fprintln(tw, "TOMBSTONE\tREASON\tAT")
		for _, t := range g.Tombstones {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", fmtID(t.DeviceID), t.Reason, fmtWhen(t.AtMS, now))
		}
		tw.Flush()
	}
}

func roles(s adminapi.SlotInfo) string {
	var r []string
	if s.Leader {
		r = append(r, "leader")
	}
	if s.LockHolder {
		r = append(r, "lock holder")
	}
	if len(r) == 0 {
		return "-"
	}
	return strings.Join(r, ", ")
}

func printSlot(w io.Writer, s adminapi.SlotDetail, now time.Time) {
	tw := newTable(w)
	fmt.Fprintf(tw, "group\t%s\n", s.Group)
	fmt.Fprintf(tw, "device\t%s (dec:%d in --json output)\n", fmtID(s.DeviceID), uint64(s.DeviceID))
	fmt.Fprintf(tw, "policy\t%s\n", s.Policy)
	if s.Connected {
		fmt.Fprintf(tw, "state\tonline since %s\n", fmtWhen(s.ConnectedSinceMS, now))
	} else if s.LastDisconnectAtMS != nil {
		fmt.Fprintf(tw, "state\toffline since %s\n", fmtWhen(s.LastDisconnectAtMS, now))
	} else {
		fmt.Fprintf(tw, "state\toffline\n")
	}
	fmt.Fprintf(tw, "created\t%s\n", fmtWhen(s.CreatedAtMS, now))
	fmt.Fprintf(tw, "queue\t%d reflection(s), %s\n", s.QueueLength, fmtBytes(s.QueueBytes))
	fmt.Fprintf(tw, "oldest queued\t%s\n", fmtWhen(s.OldestQueuedAtMS, now))
	fmt.Fprintf(tw, "leader\t%s\n", yesNo(s.Leader))
	fmt.Fprintf(tw, "lock holder\t%s\n", yesNo(s.LockHolder))
	fmt.Fprintf(tw, "device info\t%s (encrypted)\n", fmtBytes(int64(s.DeviceInfoBytes)))
	tw.Flush()
}

func describeLock(l adminapi.LockInfo) string {
	if !l.Held {
		return "none"
	}
	held := ""
	if l.HeldSeconds != nil {
		held = " for " + fmtDuration(secs(*l.HeldSeconds))
	}
	s := fmt.Sprintf("held by device %s%s", fmtDevice(l.Holder), held)
	if l.Since != nil {
		s += " (since " + *l.Since + ")"
	}
	if l.Ending {
		s += ", being released"
	}
	return s
}

func printStats(w io.Writer, st adminapi.ServerStats) {
	tw := newTable(w)
	fmt.Fprintf(tw, "uptime\t%s (since %s)\n", fmtDuration(secs(st.UptimeSeconds)), st.StartedAt)
	fmt.Fprintf(tw, "ready\t%s\n", yesNo(st.Ready))
	fmt.Fprintf(tw, "connections\t%d open: %d authenticated, %d in handshake\n",
		st.Connections.Open, st.Connections.Authenticated, st.Connections.Handshake)
	fmt.Fprintf(tw, "groups loaded\t%d\n", st.GroupsLoaded)
	fmt.Fprintf(tw, "goroutines\t%d\n", st.Goroutines)
	fmt.Fprintf(tw, "heap\t%s allocated, %s in use, %s reserved\n",
		fmtBytes(int64(st.Memory.HeapAllocBytes)), fmtBytes(int64(st.Memory.HeapInuseBytes)), fmtBytes(int64(st.Memory.HeapSysBytes)))
	fmt.Fprintf(tw, "memory\t%s from the OS, %s resident, %d GC cycles\n",
		fmtBytes(int64(st.Memory.SysBytes)), fmtBytes(int64(st.Memory.RSSBytes)), st.Memory.NumGC)
	if st.Store.Path != "" {
		fmt.Fprintf(tw, "database\t%s (%s)\n", st.Store.Path, fmtBytes(st.Store.FileBytes))
	}
	fmt.Fprintf(tw, "runtime\t%s, GOMAXPROCS %d\n", st.GoVersion, st.GOMAXPROCS)
	tw.Flush()
}

// printClusterStats is one row per node, then the sums.
func printClusterStats(w io.Writer, nodes []adminapi.NodeStats) {
	tw := newTable(w)
	fmt.Fprintln(tw, "NODE\tREADY\tUPTIME\tCONNECTIONS\tAUTHENTICATED\tGROUPS LOADED\tGOROUTINES\tHEAP\tRSS\tDATABASE")
	var conns, authed, groups, answered int
	for _, n := range nodes {
		st := n.Stats
		if st == nil {
			fmt.Fprintf(tw, "%s\t-\tdid not answer: %s\n", n.Node, n.Error)
			continue
		}
		answered++
		conns += st.Connections.Open
		authed += st.Connections.Authenticated
		groups += st.GroupsLoaded
		db := "-"
		if st.Store.Path != "" {
			db = fmtBytes(st.Store.FileBytes)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", n.Node, yesNo(st.Ready),
			fmtDuration(secs(st.UptimeSeconds)), st.Connections.Open, st.Connections.Authenticated,
			st.GroupsLoaded, st.Goroutines, fmtBytes(int64(st.Memory.HeapAllocBytes)), fmtBytes(int64(st.Memory.RSSBytes)), db)
	}
	fmt.Fprintf(tw, "total (%d of %d nodes)\t\t\t%d\t%d\t%d\t\t\t\t\n", answered, len(nodes), conns, authed, groups)
	tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// fmtDevice is a device id in the one printed form (d2m.FormatDeviceID),
// or "-" for none.
func fmtDevice(d *adminapi.JSONDeviceID) string {
	if d == nil {
		return "-"
	}
	return fmtID(*d)
}

func fmtID(d adminapi.JSONDeviceID) string { return d2m.FormatDeviceID(uint64(d)) }

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// fmtDuration is a short human duration: 850ms, 42s, 5m03s, 2h05m, 3d04h.
func fmtDuration(d time.Duration) string {
	switch {
	case d < 0:
		d = 0
		fallthrough
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
}

// fmtAgo is "5m03s ago", or "-" for an unset time.
func fmtAgo(ms *int64, now time.Time) string {
	if ms == nil {
		return "-"
	}
	return fmtDuration(now.Sub(time.UnixMilli(*ms))) + " ago"
}

// fmtWhen is the UTC time and how long ago it was.
func fmtWhen(ms *int64, now time.Time) string {
	if ms == nil {
		return "-"
	}
	return time.UnixMilli(*ms).UTC().Format(time.RFC3339) + " (" + fmtAgo(ms, now) + ")"
}

func fmtAge(seconds *float64) string {
	if seconds == nil {
		return "-"
	}
	return fmtDuration(secs(*seconds))
}

// fmtBytes is a size in B, KiB, MiB or GiB.
func fmtBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	units := []string{"KiB", "MiB", "GiB", "TiB"}
	v := float64(n)
	i := -1
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %s", math.Round(v*10)/10, units[i])
}
