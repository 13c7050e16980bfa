from gradaccum.cli import main

raise SystemExit(main())
