//go:build !unix

package reflection

import "os"

func diskBytes(fi os.FileInfo) int64 { return fi.Size() }
