//go:build unix

package reflection

import (
	"os"
	"syscall"
)

// diskBytes is the space the file's allocated blocks take (st_blocks is in
// 512-byte units on every unix).
func diskBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int64(st.Blocks) * 512
	}
	return fi.Size()
}
