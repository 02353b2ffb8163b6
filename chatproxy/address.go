package chatproxy

import "strings"

// Address fills a chat-server address template with the device's server
// group from ClientUrlInfo, replacing every "{group}" (docs/protocol.md §8.2,
// §18 row 10). Threema production, for example, uses
// "g-{group}.0.threema.ch:5222". A template without "{group}" is a fixed
// address and is returned unchanged.
func Address(template, serverGroup string) string {
	return strings.ReplaceAll(template, "{group}", serverGroup)
}
