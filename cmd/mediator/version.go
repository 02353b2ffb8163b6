package main

// `mediator version`: what was built, from the build information the Go
// toolchain embeds (module version, VCS stamp, Go version).

import (
	"fmt"
	"runtime/debug"
)

// buildVersion is the binary's build information; "(devel)" and "unknown"
// stand in for what the build did not record (`go run` stamps no VCS
// revision; a build outside a git checkout neither).
type buildVersion struct {
	Module    string `json:"module"`
	Version   string `json:"version"`
	Revision  string `json:"vcs_revision"`
	Time      string `json:"vcs_time"`
	Modified  bool   `json:"vcs_modified"`
	GoVersion string `json:"go_version"`
}

// revision is set by the Makefile (-ldflags -X main.revision=…) from git:
// the toolchain stamps vcs.revision only where .git is a directory, not in
// a git worktree or a source tree copied without .git (docker build).
var revision string

func readBuildVersion() buildVersion {
	v := buildVersion{Module: "d2m-mediator", Version: "(devel)", Revision: "unknown", Time: "unknown", GoVersion: "unknown"}
	if revision != "" {
		v.Revision = revision
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	v.GoVersion = bi.GoVersion
	if bi.Main.Path != "" {
		v.Module = bi.Main.Path
	}
	if bi.Main.Version != "" {
		v.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

func (v buildVersion) String() string {
	rev := v.Revision
	if v.Modified {
		rev += " (modified)"
	}
	return fmt.Sprintf("mediator %s %s\nrevision %s, committed %s\nbuilt with %s", v.Module, v.Version, rev, v.Time, v.GoVersion)
}

func versionCommand(args []string) error {
	fs := newCommandFlags("version", "", "Prints the module version, VCS revision and Go version of this binary.")
	jsonOut := fs.Bool("json", false, "print it as JSON")
	if _, err := parseCommandFlags(fs, args, 0); err != nil {
		return err
	}
	v := readBuildVersion()
	if *jsonOut {
		return printJSON(v)
	}
	_, err := fmt.Fprintln(stdout, v)
	return err
}
