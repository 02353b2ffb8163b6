package d2m

import (
	"fmt"
	"strconv"
	"strings"
)

// FormatDeviceID is the one printed form of a mediator device id (a random
// u64, §6): "0x" and 16 lower-case hex digits, zero-padded so ids line up
// in tables and can be searched for verbatim in logs. The operator CLI,
// d2m-device and the README use it; ParseDeviceID reads it back.
func FormatDeviceID(id uint64) string {
	const digits = "0123456789abcdef"
	var b [18]byte
	b[0], b[1] = '0', 'x'
	for i := 17; i >= 2; i-- {
		b[i] = digits[id&0xf]
		id >>= 4
	}
	return string(b[:])
}

// ParseDeviceID reads a device id typed by a person or copied from output:
//
//	0x00000000000000a3   the printed form (FormatDeviceID)
//	0xa3                 0x-prefixed hex of any length up to 16 digits
//	00000000000000a3     the printed form without 0x (exactly 16 hex digits)
//	dec:163              decimal, as the admin API's JSON carries ids
//
// A bare number shorter than 16 digits is refused rather than guessed: "17"
// could be the decimal 17 or the hex 0x17.
func ParseDeviceID(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	lower := strings.ToLower(in)
	var v uint64
	var err error
	switch {
	case strings.HasPrefix(lower, "0x"):
		h := lower[2:]
		if h == "" || len(h) > 16 {
			return 0, deviceIDError(s)
		}
		v, err = strconv.ParseUint(h, 16, 64)
	case strings.HasPrefix(lower, "dec:"):
		v, err = strconv.ParseUint(lower[4:], 10, 64)
	case len(lower) == 16:
		v, err = strconv.ParseUint(lower, 16, 64)
	default:
		return 0, deviceIDError(s)
	}
	if err != nil {
		return 0, deviceIDError(s)
	}
	return v, nil
}

func deviceIDError(s string) error {
	return fmt.Errorf("device id %q: want 0x and up to 16 hex digits as printed (0x00000000000000a3 or 0xa3), "+
		"16 hex digits without 0x, or dec: and a decimal number (dec:163)", s)
}
